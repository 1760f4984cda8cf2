"""`lorafleet models` and `lorafleet loras`: the base models and LoRAs a fleet has to work with."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from rich.table import Table

from lorafleet.common.catalog.lora_files import LoraInfo, describe_file, read_safetensors_header
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.catalog.shared_files import LoraRegistry
from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.errors import BadArgument, InvalidInput, ModelError
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.display import DownloadProgress
from lorafleet.producer.cli.terminal import console, print_json, run, safe
from lorafleet.producer.cli.worker_side import worker_side
from lorafleet.producer.file_imports import import_file
from lorafleet.producer.lora_imports import import_lora

models_app = typer.Typer(help="Registered base models.", no_args_is_help=True)
embeddings_app = typer.Typer(
    help="Textual-inversion embeddings (autoimport/embedding).", no_args_is_help=True
)
vaes_app = typer.Typer(help="Separate VAE files (autoimport/vae).", no_args_is_help=True)
loras_app = typer.Typer(help="LoRA files in the autoimport folder.", no_args_is_help=True)

UNMATCHED_SHOWN = 10
"""Unmatched keys `loras inspect` names (all of them with --json)."""
_METADATA_SHOWN = (
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_output_name",
    "modelspec.architecture",
    "modelspec.title",
)


# ---------------------------------------------------------------------------- models
@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Models: pipeline folders under <home>/models, and those registered for every machine."""
    settings = Settings()
    registry = ModelRegistry(settings, run(lambda: fleet_redis(settings)))
    local, registered = set(registry.local_names()), registry.registered()
    rows = []
    for name in registry.names():
        ref = registry.get(name)
        where = "local" if name in local else "shared"
        rows.append(
            {
                "name": name,
                "where": where,
                "family": ref.family.value if ref.family else None,
                "native_size": ref.native_size,
                # what tells a flow family's variants apart: dev/schnell, Klein 4B/9B
                "guidance_embeds": ref.guidance_embeds,
                "distilled": ref.distilled,
                "transformer_width": ref.transformer_width,
                "quantized": ref.quantized,  # a GGUF file: LoRAs beside its weights only
                "source": ref.source,
                "queue": ref.queue,
                "registered": name in registered,
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title=str(settings.models_dir))
    table.add_column("name", no_wrap=True)
    for column in ("where", "family", "native size"):
        table.add_column(column)
    table.add_column("source", overflow="fold")
    table.add_column("queue", no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"],
            row["where"],
            row["family"] or "?",
            str(row["native_size"] or "?"),
            safe(row["source"]),
            row["queue"],
        )
    console.print(table)


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="The name jobs and `lorafleet worker --models` use.")],
    source: Annotated[
        str,
        typer.Argument(
            help="A pipeline folder, .safetensors checkpoint or GGUF transformer as the workers see it (absolute path), "
            "or a hub id owner/name."
        ),
    ],
    family: Annotated[
        str | None,
        typer.Option(
            help="sd15, sd2, sdxl, flux1, zimage, qwenimage or flux2, when the folder is not readable here (or for a hub id)."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="For a single-file checkpoint: the diffusers folder (as the workers see it) or hub id "
            "its component configs come from (default: LORAFLEET_CHECKPOINT_CONFIGS, else the family's repo).",
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option("--vae", help="A VAE in autoimport/vae that the model's jobs decode with by default."),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="For a transformer-only checkpoint (FLUX.1, Z-Image, Qwen-Image, FLUX.2): the model of the same "
            "family its text encoders, tokenizers and VAE come from: a registered name, a folder or a hub id "
            "(default: LORAFLEET_CHECKPOINT_CONFIGS, else the family's repo).",
        ),
    ] = None,
) -> None:
    """Register a base model by name in Redis, so every producer and worker agrees on it."""
    settings = Settings()

    def action():
        try:
            chosen = Family.parse(family)
        except ValueError:
            raise BadArgument(
                f"got {family!r}", field="--family", allowed=", ".join(f.value for f in Family)
            ) from None
        ref = ModelRegistry(settings, resolve_broker(settings).client()).register(
            name, source, chosen, config, vae, base
        )
        console.print(
            f"registered {name}: {ref.source} ({ref.family.value if ref.family else 'family unknown'}), "
            f"queue {ref.queue}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    run(action)


@models_app.command("remove")
def models_remove(name: Annotated[str, typer.Argument(help="A model registered with `models add`.")]) -> None:
    """Unregister a model (its queue and jobs are left alone)."""
    settings = Settings()
    removed = run(lambda: ModelRegistry(settings, resolve_broker(settings).client()).unregister(name))
    console.print(
        f"removed {name}" if removed else f"{name} was not registered", markup=False, highlight=False
    )
    if not removed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- loras
@loras_app.command("list")
def loras_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """LoRAs in the autoimport folder and in the shared registry, with format, family, rank, triggers."""
    settings = Settings()
    registry = run(lambda: _lora_registry(settings))
    catalog = LoraCatalog(settings.lora_dir, registry)
    registered = set(catalog.registered_names())
    rows: list[dict[str, Any]] = []
    for name in catalog.names():
        path = catalog.path_of(name)
        where = "local+shared" if path and name in registered else ("local" if path else "shared")
        try:
            info = catalog.get(name)
        except InvalidInput as exc:
            rows.append({"name": name, "where": where, "refused": exc.message})
            continue
        rows.append(_summary(info) | {"where": where})
    if as_json:
        print_json(rows)
        return
    table = Table(
        "name",
        "where",
        "format",
        "family",
        "rank",
        "size",
        "sha256",
        "trigger words",
        title=str(catalog.folder),
    )
    for row in rows:
        if "refused" in row:
            table.add_row(
                safe(row["name"]), row["where"], "[red]refused[/]", "", "", "", "", safe(row["refused"])
            )
        else:
            table.add_row(
                safe(row["name"]),
                row["where"],
                row["format"],
                row["family"] or "?",
                str(row["rank"] or "-"),
                f"{row['size'] / 1024:.0f} KiB",
                row["sha256"][:12],
                safe(", ".join(row["trigger_words"])),
            )
    console.print(table)


def _summary(info: LoraInfo) -> dict[str, Any]:
    data = asdict(info)
    data["path"] = str(info.path or info.object_key)
    data["family"] = info.family.value if info.family else None
    data["metadata"] = {k: v for k, v in info.metadata.items() if k in _METADATA_SHOWN}
    return data


def _find(settings: Settings, file_or_name: str) -> LoraInfo:
    """A file given by path, or a LoRA by name: the folder's, or the registry's (fetched)."""
    path = Path(file_or_name).expanduser()
    if path.is_file():
        return describe_file(path)
    registry = _lora_registry(settings)
    catalog = LoraCatalog(settings.lora_dir, registry)
    info = catalog.get(file_or_name)
    if info.path is not None:
        return info
    # Registered only: fetch it into this machine's disk cache, as a worker would.
    lora_files = worker_side("lora.files")
    cache = lora_files.DiskCache(settings.lora_disk_cache_folder, settings.lora_disk_cache_mb * 1024 * 1024)
    return lora_files.LoraFiles(catalog, open_storage(settings), cache).get(file_or_name)


@loras_app.command("inspect")
def loras_inspect(
    file_or_name: Annotated[
        str, typer.Argument(help="A .safetensors file, or the name of one in the autoimport folder.")
    ],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Match the file's keys against this model's layers.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Format, family, rank, trigger words, hash and size; with --model, matched and unmatched keys."""
    settings = Settings()

    def action():
        info = _find(settings, file_or_name)
        data = _summary(info)
        if model:
            data["match"] = _match(settings, info, model)
        if as_json:
            print_json(data)
            return
        table = Table(show_header=False, box=None)
        for key in ("name", "path", "format", "family", "rank", "tensor_count", "size", "sha256", "is_lcm"):
            table.add_row(f"[bold]{key}[/]", safe(str(data[key])))
        table.add_row("[bold]trigger words[/]", safe(", ".join(info.trigger_words) or "-"))
        for key, value in data["metadata"].items():
            table.add_row(f"[bold]{safe(key)}[/]", safe(value))
        if model:
            match = data["match"]
            layers = ", ".join(f"{n} {c}" for c, n in match["matched"].items()) or "none"
            table.add_row("[bold]model[/]", safe(f"{match['model']} ({match['family'] or '?'})"))
            table.add_row("[bold]matched layers[/]", safe(layers))
            unmatched = match["unmatched"]
            shown = ", ".join(unmatched[:UNMATCHED_SHOWN]) + (
                " ..." if len(unmatched) > UNMATCHED_SHOWN else ""
            )
            table.add_row(
                "[bold]unmatched keys[/]", safe(f"{len(unmatched)}" + (f": {shown}" if unmatched else ""))
            )
            if match["family_mismatch"]:
                table.add_row("[bold red]refused[/]", safe(match["family_mismatch"]))
        console.print(table)

    run(action)


def _match(settings: Settings, info: LoraInfo, model_name: str) -> dict[str, Any]:
    try:
        model = ModelRegistry(settings, fleet_redis(settings)).get(model_name)
    except ModelError as exc:
        raise BadArgument(exc.reason, field="--model", allowed=exc.allowed) from None
    if model.path is None or info.path is None:
        raise BadArgument(
            "matching needs the model's folder on this machine",
            field="--model",
            allowed="a registered model or a diffusers folder",
        )
    pipelines = worker_side("pipelines")
    lora_formats = worker_side("lora.formats")
    module_index = worker_side("lora.module_index")

    index = module_index.ModuleIndex(pipelines.empty_components(model.path, model.family))
    report = lora_formats.match_keys(list(read_safetensors_header(info.path).tensors), index)
    mismatch = None
    if info.family and model.family and info.family != model.family:
        mismatch = f"the LoRA is for {info.family.value}, the model is {model.family.value}"
    return {
        "model": model.key,
        "family": model.family.value if model.family else None,
        "matched": report.matched,
        "unmatched": report.unmatched,
        "family_mismatch": mismatch,
    }


@loras_app.command("import")
def loras_import(
    source: Annotated[
        str,
        typer.Argument(
            help="A .safetensors file, a diffusers LoRA folder, an http(s) download link, "
            "a hub repo owner/repo or owner/repo/file.safetensors."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Name to use (default: the name the source gives).")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Refuse the file unless it has this sha256.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a different file of the same name.")
    ] = False,
) -> None:
    """Fetch and check a LoRA, copy it into the autoimport folder (usable by its name at once)
    and, when a broker is reachable, share it with every machine."""
    settings = Settings()

    def action():
        with DownloadProgress(console) as progress:
            result = import_lora(
                settings,
                source,
                fleet_redis(settings),
                name=name,
                sha256=sha256,
                force=force,
                progress=progress.update,
            )
        info = result.info
        if result.already_imported:
            console.print(f"{info.name}: already imported ({info.short_hash})", markup=False)
        else:
            family = info.family.value if info.family else "family unknown"
            console.print(
                f"imported {info.name}: {info.format}, {family}, rank {info.rank}, sha256 {info.short_hash}",
                markup=False,
            )
        if result.stored_as is None:
            console.print(
                "not registered for other machines: no broker is configured and the embedded Redis is not running",
                markup=False,
                highlight=False,
            )
        else:
            console.print(
                f"{'stored' if result.newly_stored else 'already stored'} as {result.stored_as} in {result.store}; "
                f"registered as {info.name!r} for every worker on this broker",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    run(action)


def fleet_redis(settings: Settings) -> redis.Redis | None:
    """The configured broker, or the embedded Redis if it runs (never started just to look).

    A lone machine with no broker configured and its embedded Redis stopped has nothing
    shared: its workers read the autoimport folder and the models folder.
    """
    if not settings.broker_url and not embedded_redis(settings).ping():
        return None
    return resolve_broker(settings).client()


def _lora_registry(settings: Settings) -> LoraRegistry | None:
    """The fleet's shared LoRA registry; None as above."""
    client = fleet_redis(settings)
    return LoraRegistry(client) if client else None


def import_shared_file(kind: str, source: str, name: str | None, sha256: str | None = None) -> None:
    settings = Settings()

    def action():
        with DownloadProgress(console) as progress:
            result = import_file(
                settings, kind, source, fleet_redis(settings), name, sha256=sha256, progress=progress.update
            )
        console.print(
            f"imported {kind} {result.name} (sha256 {result.sha256[:12]}) into {result.destination.parent}",
            markup=False,
            highlight=False,
        )
        if result.shared is None:
            console.print(
                "not registered for other machines: no broker is configured and the embedded Redis "
                "is not running",
                markup=False,
                highlight=False,
            )
        else:
            console.print(
                f"stored as {result.shared.object_key}; registered as {result.name!r} for every machine "
                "on this broker",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    run(action)


def source_argument(what: str):
    """The SOURCE argument of an import: a local file, a download link, a hub file."""
    return typer.Argument(
        help=f"{what}: a local file, an http(s) download link, or a hub file owner/repo[/file.safetensors]."
    )


Sha256Option = Annotated[
    str | None, typer.Option("--sha256", help="Refuse the file unless it has this sha256.")
]


@embeddings_app.command("import")
def embeddings_import(
    source: Annotated[str, source_argument("A .safetensors embedding")],
    name: Annotated[str | None, typer.Option(help="The word prompts use (default: the file's name).")] = None,
    sha256: Sha256Option = None,
) -> None:
    """Fetch and check an embedding, share it with every machine and drop it into autoimport/embedding."""
    import_shared_file("embedding", source, name, sha256)


@vaes_app.command("import")
def vaes_import(
    source: Annotated[str, source_argument("A single-file .safetensors VAE")],
    name: Annotated[str | None, typer.Option(help="Its name for jobs (default: the file's name).")] = None,
    sha256: Sha256Option = None,
) -> None:
    """Fetch and check a VAE file, share it with every machine and drop it into autoimport/vae."""
    import_shared_file("vae", source, name, sha256)
