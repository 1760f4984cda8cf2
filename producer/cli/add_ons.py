"""`lorafleet controlnets` and `lorafleet upscalers`: the add-on models a job may name beside
its base model and LoRAs (a ControlNet or a T2I-Adapter steers it by a control image; an
ESRGAN-family upscaler enlarges the hires fix's first pass)."""

from __future__ import annotations

from typing import Annotated

import typer

from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.catalog import Sha256Option, fleet_redis, import_shared_file, source_argument
from lorafleet.producer.cli.terminal import console, print_json, run, safe

controlnets_app = typer.Typer(
    help="ControlNets and T2I-Adapters (autoimport/controlnet).", no_args_is_help=True
)
upscalers_app = typer.Typer(
    help="ESRGAN-family upscalers for the hires fix (autoimport/upscaler).", no_args_is_help=True
)


@controlnets_app.command("import")
def controlnets_import(
    source: Annotated[str, source_argument("A single-file .safetensors ControlNet or T2I-Adapter")],
    name: Annotated[str | None, typer.Option(help="Its name for jobs (default: the file's name).")] = None,
    sha256: Sha256Option = None,
) -> None:
    """Fetch and check a ControlNet or T2I-Adapter file, share it with every machine and drop it
    into autoimport/controlnet."""
    import_shared_file("controlnet", source, name, sha256)


@controlnets_app.command("list")
def controlnets_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """ControlNets and T2I-Adapters here (files and diffusers folders) and those registered for every machine."""
    from lorafleet.common.catalog.controlnets import ControlNetCatalog

    def row(info) -> dict:
        adapter = info.adapter.config() if info.adapter is not None else None
        if adapter is not None:
            widths = ", ".join(map(str, adapter["channels"]))
            detail = f"{info.sha256[:12]}, T2I-Adapter ({adapter['adapter_type']}), widths {widths}"
        else:
            detail = f"{info.sha256[:12]}, ControlNet, text width {info.cross_attention_dim or '?'}"
        fields = {"kind": info.kind, "cross_attention_dim": info.cross_attention_dim, "adapter": adapter}
        return {"name": info.name, "sha256": info.sha256, **fields, "detail": detail}

    _list(ControlNetCatalog, "controlnet", "controlnet_dir", row, as_json)


def _list(catalog_class, kind: str, folder: str, row, as_json: bool) -> None:
    """Print the catalog's entries (``row``: an entry's fields and its ``detail`` line); a
    refused file is listed with why."""
    from lorafleet.common.catalog.shared_files import SharedFiles

    settings = Settings()
    client = run(lambda: fleet_redis(settings))
    catalog = catalog_class(getattr(settings, folder), SharedFiles(client, kind) if client else None)
    rows = []
    for name in catalog.names():
        try:
            rows.append(row(catalog.get(name)))
        except catalog_class.error as exc:
            rows.append({"name": name, "refused": exc.reason, "detail": exc.reason})
    if as_json:
        print_json([{k: v for k, v in r.items() if k != "detail"} for r in rows])
        return
    for r in rows:
        console.print(f"{safe(r['name'])}  {safe(r['detail'])}", highlight=False)


@upscalers_app.command("import")
def upscalers_import(
    source: Annotated[str, source_argument("An ESRGAN or Real-ESRGAN (RRDB) .safetensors model")],
    name: Annotated[
        str | None, typer.Option(help="Its name for jobs' --hr-upscaler (default: the file's name).")
    ] = None,
    sha256: Sha256Option = None,
) -> None:
    """Fetch and check an upscaler file, share it with every machine and drop it into autoimport/upscaler."""
    import_shared_file("upscaler", source, name, sha256)


@upscalers_app.command("list")
def upscalers_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Upscalers here and those registered for every machine, with their scale."""
    from lorafleet.common.catalog.upscalers import UpscalerCatalog

    def row(info) -> dict:
        blocks = info.shape.get("blocks")
        fields = {"sha256": info.sha256, "scale": info.scale, "blocks": blocks}
        return {
            "name": info.name,
            **fields,
            "detail": f"{info.sha256[:12]}, {info.scale:g}x, {blocks} RRDB blocks",
        }

    _list(UpscalerCatalog, "upscaler", "upscaler_dir", row, as_json)
