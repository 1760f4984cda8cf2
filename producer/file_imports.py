"""Importing an embedding, a VAE, a ControlNet or an upscaler file for the fleet: checked, shared, dropped into the folder.

As ``lora_imports`` does for LoRAs, in the same order: the file is fetched from its source
(a local file, a download link, a hub file), checked (an embedding's vectors, a VAE's decoder,
a ControlNet's hint block, an upscaler's network), stored by sha256 and registered when a
broker is reachable, then copied into this machine's ``autoimport/<kind>`` folder. A refused
file leaves nothing behind, a download included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from lorafleet.common.catalog.controlnets import ControlNetInfo, read_control
from lorafleet.common.catalog.embeddings import describe_embedding
from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, sha256_file
from lorafleet.common.catalog.shared_files import Kind, SharedFile, SharedFiles
from lorafleet.common.catalog.upscalers import describe_upscaler
from lorafleet.common.catalog.vaes import check_vae_file
from lorafleet.common.infra.storage import copy_atomic, open_storage
from lorafleet.common.schema.errors import BadArgument, FileRefused
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.lora_imports import target_name
from lorafleet.producer.lora_sources import Progress, fetch


@dataclass
class ImportedFile:
    name: str
    sha256: str
    destination: Path
    shared: SharedFile | None


def import_file(
    settings: Settings,
    kind: Kind,
    source: str | Path,
    client: redis.Redis | None,
    name: str | None = None,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
) -> ImportedFile:
    """Check the file ``source`` names (a local file, an http(s) download link, a hub file
    ``owner/repo[/file.safetensors]``: ``lora_sources.fetch``, as for LoRAs) as an embedding,
    a VAE, a ControlNet or an upscaler, share it, and drop it into its folder."""
    local = Path(source).expanduser() if not isinstance(source, Path) else source
    if local.is_dir():
        raise BadArgument(
            f"{local} is a folder",
            field="SOURCE",
            allowed=f"a .safetensors {kind} file, an http(s) URL or owner/repo[/file.safetensors] (copy a "
            f"diffusers folder into autoimport/ on each machine)",
        )
    fetched = fetch(str(source), settings.home / "cache" / "downloads", sha256=sha256, progress=progress)
    try:
        return _import(settings, kind, fetched.path, client, name or fetched.suggested_name)
    except FileRefused as exc:
        where = str(source) if fetched.temporary else fetched.path.name
        raise FileRefused(f"{where} is not a usable {kind}: {exc.reason}", field="SOURCE") from None
    finally:
        fetched.discard()


def _import(
    settings: Settings, kind: Kind, file: Path, client: redis.Redis | None, name: str
) -> ImportedFile:
    target = target_name(name)  # FileRefused from a check: import_file names the source
    if kind == "embedding":
        info = describe_embedding(file, target)
        sha256, meta, folder = (
            info.sha256,
            {"vectors": info.vectors, "widths": info.widths},
            settings.embedding_dir,
        )
    elif kind == "upscaler":
        upscaler = describe_upscaler(file, target)
        sha256, meta, folder = upscaler.sha256, {"shape": upscaler.shape}, settings.upscaler_dir
    elif kind == "controlnet":  # a ControlNet or a T2I-Adapter, its kind in the registry
        width, adapter = read_control(file)
        control = ControlNetInfo(target, file, True, sha256_file(file), width, adapter=adapter)
        sha256, meta, folder = control.sha256, control.meta(), settings.controlnet_dir
    else:
        check_vae_file(file)
        sha256, meta, folder = sha256_file(file), {}, settings.vae_dir
    shared = None
    if client is not None:
        shared = SharedFiles(client, kind).publish(target, file, sha256, meta, open_storage(settings))
    destination = folder / f"{target}{SAFETENSORS_SUFFIX}"
    if not (destination.exists() and sha256_file(destination) == sha256):
        copy_atomic(file, destination)
    return ImportedFile(target, sha256, destination, shared)
