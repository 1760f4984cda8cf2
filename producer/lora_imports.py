"""Importing a LoRA: fetched from its source, checked, dropped into the folder, shared.

The same steps for every source and every front end (`lorafleet loras import`, the SDK's
``Client.import_lora``): ``lora_sources.fetch`` makes it a local file; the file is checked
as any LoRA is (safetensors only, header and tensor table, family); it is copied into the
autoimport folder under its name (atomically: a reader sees no half file); when a broker is
reachable it is stored by sha256 in the object store and its name registered for every
machine. A refused file leaves nothing behind: no folder entry, no object, no name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import redis

from lorafleet.common.errors import BadArgument, FileRefused
from lorafleet.common.jobs import check_lora_name
from lorafleet.common.loras.catalog import LoraCatalog
from lorafleet.common.loras.files import SAFETENSORS_SUFFIX, LoraInfo, describe_file
from lorafleet.common.loras.registry import LoraRegistry, object_key
from lorafleet.common.settings import Settings
from lorafleet.common.storage import copy_atomic, open_storage
from lorafleet.producer.lora_sources import Progress, UrlCheck, fetch


@dataclass
class ImportedLora:
    """What an import did."""

    info: LoraInfo
    already_imported: bool
    stored_as: str | None = None
    """The object key in the store; None when no broker was reachable to share it."""
    store: str | None = None
    newly_stored: bool = False


def import_lora(
    settings: Settings,
    source: str,
    client: redis.Redis | None,
    *,
    name: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    remote: UrlCheck | None = None,
) -> ImportedLora:
    """Import the LoRA ``source`` names under ``name`` (default: the name its source suggests);
    ``remote`` for sources a remote client gave (see ``lora_sources.fetch``)."""
    fetched = fetch(
        source, settings.home / "cache" / "downloads", sha256=sha256, progress=progress, remote=remote
    )
    try:
        target = name or fetched.suggested_name
        if target.lower().endswith(SAFETENSORS_SUFFIX):
            target = target[: -len(SAFETENSORS_SUFFIX)]
        try:
            check_lora_name(target)
        except ValueError as exc:
            raise BadArgument(f"{target!r} {exc}", field="--name") from None
        try:
            info = describe_file(fetched.path, target)
        except FileRefused as exc:
            where = source if fetched.temporary else fetched.path.name
            raise FileRefused(f"{where} is not a usable LoRA: {exc.reason}", field="SOURCE") from None
        destination = settings.lora_dir / f"{target}{SAFETENSORS_SUFFIX}"
        already = False
        if destination.exists():
            existing = LoraCatalog(settings.lora_dir).describe(destination)
            already = existing.sha256 == info.sha256
            if not already and not force:
                raise BadArgument(
                    f"a different {target!r} is already imported ({existing.sha256[:12]})",
                    field="--name",
                    allowed="another --name, or --force to replace it",
                )
        if not already:
            copy_atomic(fetched.path, destination)
    finally:
        fetched.discard()
    info = replace(info, name=target, path=destination)
    result = ImportedLora(info=info, already_imported=already)
    if client is not None:
        storage = open_storage(settings)
        result.newly_stored = LoraRegistry(client).publish(info, storage)
        result.stored_as, result.store = object_key(info.sha256), storage.describe()
    return result
