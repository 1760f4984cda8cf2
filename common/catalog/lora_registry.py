"""LoRAs shared across machines: files in the object store by sha256, names in Redis.

`lorafleet loras import FILE` checks the file, stores it once under
``loras/<sha256>.safetensors`` in the configured storage (the same store as the images) and
registers its name in the Redis hash ``keys.REGISTERED_LORAS`` with what a producer needs to
resolve a job without the file: family, format, rank, trigger words, size, hash.

A worker that meets a registered name it has no local file for fetches the object into its
disk cache (``lorafleet.worker.lora.files``); nothing here touches a worker's disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace

import redis

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, LoraInfo
from lorafleet.common.infra.storage import Storage, check_key
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.schema.family import Family


def object_key(sha256: str) -> str:
    """Where the file with this sha256 is kept in the store."""
    return check_key(f"loras/{sha256}{SAFETENSORS_SUFFIX}")


class LoraRegistry:
    """Registered LoRA names (Redis) and their files (the object store)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def publish(self, info: LoraInfo, storage: Storage) -> bool:
        """Store the file (once per hash) and register its name; True if the object was new."""
        if info.path is None:
            raise BadArgument(f"LoRA {info.name!r} has no local file to publish", field="FILE")
        key = object_key(info.sha256)
        new = not storage.exists(key)
        if new:
            storage.put(key, info.path.read_bytes(), "application/octet-stream")
        # The layout older lorafleet versions read: the object key in "path", no other new field.
        entry = asdict(replace(info, path=None, object_key=None)) | {"path": key}
        entry.pop("object_key")
        self.redis.hset(keys.REGISTERED_LORAS, info.name, json.dumps(entry))
        return new

    def lookup(self, name: str) -> LoraInfo | None:
        """The registered LoRA ``name`` (no local path; ``object_key`` set), or None."""
        raw = self.redis.hget(keys.REGISTERED_LORAS, name)
        if raw is None:
            return None
        entry = json.loads(raw)
        stored = entry.pop("object_key", None) or entry.get("path")  # the object key
        family = Family.parse(entry.pop("family", None))
        known = {f.name for f in fields(LoraInfo)}
        entry = {k: v for k, v in entry.items() if k in known}  # entries from newer versions may say more
        return LoraInfo(**entry | {"path": None, "object_key": stored, "family": family})

    def snapshot(self, name: str) -> bytes | None:
        """The registry's entry for ``name`` as stored, to put back with ``restore``."""
        return self.redis.hget(keys.REGISTERED_LORAS, name)

    def restore(self, name: str, snapshot: bytes | None) -> None:
        """Put ``name``'s entry back as ``snapshot`` had it (None: not registered)."""
        if snapshot is None:
            self.redis.hdel(keys.REGISTERED_LORAS, name)
        else:
            self.redis.hset(keys.REGISTERED_LORAS, name, snapshot)

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.hkeys(keys.REGISTERED_LORAS))

    def remove(self, name: str) -> bool:
        return bool(self.redis.hdel(keys.REGISTERED_LORAS, name))
