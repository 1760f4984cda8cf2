"""Importing a LoRA: fetched from its source, checked, shared, dropped into the folder.

The same steps for every source and every front end (`lorafleet loras import`, the SDK's
``Client.import_lora``, ``POST /v1/loras``): ``lora_sources.fetch`` makes it a local file;
the file is checked as any LoRA is (safetensors only, header and tensor table, family);
when a broker is reachable it is stored by sha256 in the object store and its name
registered for every machine; last it is copied into the autoimport folder under its name
(atomically: a reader sees no half file). A refused file leaves nothing behind; a store or
broker that fails leaves the folder as it was; a copy that fails puts the registry entry back.
Two imports of the same name at the same moment are not serialized: the last one wins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import redis

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, LoraInfo, describe_file
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.shared_files import LoraRegistry, object_key
from lorafleet.common.infra.storage import copy_atomic, open_storage
from lorafleet.common.schema.errors import BadArgument, FileRefused
from lorafleet.common.schema.jobs import check_lora_name
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.lora_sources import Progress, UrlCheck, fetch

MAX_NAME = 200
"""Longest LoRA name (a job's LoraSpec allows as many; file systems allow 255 bytes)."""


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
        target = target_name(name or fetched.suggested_name)
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
        result = ImportedLora(info=replace(info, name=target, path=destination), already_imported=already)
        # Shared first, copied last: a store or broker that fails leaves the folder as it was,
        # and a copy that fails puts the registry entry back as it was.
        registry = LoraRegistry(client) if client is not None else None
        before = registry.snapshot(target) if registry is not None else None
        if registry is not None:
            storage = open_storage(settings)
            result.newly_stored = registry.publish_lora(replace(info, name=target), storage)
            result.stored_as, result.store = object_key(info.sha256), storage.describe()
        if not already:
            try:
                copy_atomic(fetched.path, destination)
            except BaseException:
                if registry is not None:
                    registry.restore(target, before)
                raise
    finally:
        fetched.discard()
    return result


def target_name(name: str) -> str:
    """The name a LoRA is imported under, checked: a plain file name of at most MAX_NAME characters."""
    if name.lower().endswith(SAFETENSORS_SUFFIX):
        name = name[: -len(SAFETENSORS_SUFFIX)]
    try:
        check_lora_name(name)
    except ValueError as exc:
        raise BadArgument(f"{name!r} {exc}", field="--name") from None
    if len(name) > MAX_NAME or len(name.encode()) > MAX_NAME:
        raise BadArgument(f"a name of {len(name)} characters", field="--name", allowed=f"at most {MAX_NAME}")
    return name
