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
    from lorafleet.common.catalog.controlnets import ControlNetCatalog, ControlNetError
    from lorafleet.common.catalog.shared_files import SharedFiles

    settings = Settings()
    client = run(lambda: fleet_redis(settings))
    catalog = ControlNetCatalog(
        settings.controlnet_dir, SharedFiles(client, "controlnet") if client else None
    )
    rows = []
    for name in catalog.names():
        try:
            info = catalog.get(name)
        except ControlNetError as exc:
            rows.append({"name": name, "refused": exc.reason})
            continue
        rows.append(
            {
                "name": info.name,
                "kind": info.kind,
                "sha256": info.sha256,
                "cross_attention_dim": info.cross_attention_dim,
                "adapter": info.adapter.config() if info.adapter is not None else None,
            }
        )
    if as_json:
        print_json(rows)
        return
    for row in rows:
        if "refused" in row:
            detail = row["refused"]
        elif row["adapter"] is not None:
            widths = ", ".join(map(str, row["adapter"]["channels"]))
            detail = f"{row['sha256'][:12]}, T2I-Adapter ({row['adapter']['adapter_type']}), widths {widths}"
        else:
            detail = f"{row['sha256'][:12]}, ControlNet, text width {row['cross_attention_dim'] or '?'}"
        console.print(f"{safe(row['name'])}  {safe(detail)}", highlight=False)


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
    from lorafleet.common.catalog.shared_files import SharedFiles
    from lorafleet.common.catalog.upscalers import UpscalerCatalog, UpscalerError

    settings = Settings()
    client = run(lambda: fleet_redis(settings))
    catalog = UpscalerCatalog(settings.upscaler_dir, SharedFiles(client, "upscaler") if client else None)
    rows = []
    for name in catalog.names():
        try:
            info = catalog.get(name)
        except UpscalerError as exc:
            rows.append({"name": name, "refused": exc.reason})
            continue
        rows.append(
            {
                "name": info.name,
                "sha256": info.sha256,
                "scale": info.scale,
                "blocks": info.shape.get("blocks"),
            }
        )
    if as_json:
        print_json(rows)
        return
    for row in rows:
        detail = row.get("refused") or f"{row['sha256'][:12]}, {row['scale']:g}x, {row['blocks']} RRDB blocks"
        console.print(f"{safe(row['name'])}  {safe(detail)}", highlight=False)
