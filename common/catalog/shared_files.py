"""Files shared across machines: objects in the store by sha256, names in Redis.

`lorafleet loras import FILE`, `lorafleet embeddings import FILE` and `lorafleet vaes import
FILE` store the file once under ``<kind>s/<sha256>.safetensors`` in the object store (the
images' store) and register its name in one Redis hash per kind, with what a producer needs
to check a job without the file: a LoRA's family, format, rank and trigger words; an
embedding's vector count and widths. A worker without a local file of that name fetches the
object into its disk cache and checks its sha256 (``lorafleet.worker.lora.files``). A file in
a machine's own autoimport folder wins for its name.

One registry serves every kind (``SharedFiles``); LoRAs read and write their entries in the
layout lorafleet 0.1 wrote (``LoraRegistry``), so older producers and workers still read them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import redis

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, LoraInfo
from lorafleet.common.infra.storage import Storage, check_key
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.schema.family import Family

Kind = Literal["lora", "embedding", "vae", "controlnet", "upscaler"]
_WHERE = {
    "lora": (keys.REGISTERED_LORAS, "loras"),
    "embedding": (keys.REGISTERED_EMBEDDINGS, "embeddings"),
    "vae": (keys.REGISTERED_VAES, "vaes"),
    "controlnet": (keys.REGISTERED_CONTROLNETS, "controlnets"),
    "upscaler": (keys.REGISTERED_UPSCALERS, "upscalers"),
}
"""Each kind's Redis hash of names and its folder in the object store."""


def object_key(sha256: str, kind: Kind = "lora") -> str:
    """Where the file of ``kind`` with this sha256 is kept in the store."""
    return check_key(f"{_WHERE[kind][1]}/{sha256}{SAFETENSORS_SUFFIX}")


@dataclass(frozen=True)
class SharedFile:
    """A registered file: its name, hash, object and what its kind records about it."""

    name: str
    sha256: str
    object_key: str
    size: int
    meta: dict = field(default_factory=dict)


class SharedFiles:
    """Registered files of one kind (Redis) and their objects (the store)."""

    def __init__(self, client: redis.Redis, kind: Kind) -> None:
        self.redis = client
        self.kind = kind
        self._hash = _WHERE[kind][0]

    def object_key(self, sha256: str) -> str:
        return object_key(sha256, self.kind)

    def store_once(self, path: Path, sha256: str, storage: Storage) -> bool:
        """Put the file's object in the store unless it is there; True if it was new."""
        key = self.object_key(sha256)
        new = not storage.exists(key)
        if new:
            storage.put(key, path.read_bytes(), "application/octet-stream")
        return new

    def publish(self, name: str, path: Path, sha256: str, meta: dict, storage: Storage) -> SharedFile:
        """Store the file (once per hash) and register its name for every machine."""
        shared = SharedFile(name, sha256, self.object_key(sha256), path.stat().st_size, meta)
        self.store_once(path, sha256, storage)
        entry = {"sha256": sha256, "object_key": shared.object_key, "size": shared.size, "meta": meta}
        self.redis.hset(self._hash, name, json.dumps(entry))
        return shared

    def lookup(self, name: str) -> SharedFile | None:
        raw = self.redis.hget(self._hash, name)
        if raw is None:
            return None
        entry = json.loads(raw)
        return SharedFile(
            name, entry["sha256"], entry["object_key"], entry.get("size", 0), entry.get("meta", {})
        )

    def snapshot(self, name: str) -> bytes | None:
        """The entry for ``name`` as stored, to put back with ``restore``."""
        return self.redis.hget(self._hash, name)

    def restore(self, name: str, snapshot: bytes | None) -> None:
        """Put ``name``'s entry back as ``snapshot`` had it (None: not registered)."""
        if snapshot is None:
            self.redis.hdel(self._hash, name)
        else:
            self.redis.hset(self._hash, name, snapshot)

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.hkeys(self._hash))

    def remove(self, name: str) -> bool:
        return bool(self.redis.hdel(self._hash, name))


class LoraRegistry(SharedFiles):
    """Registered LoRAs: the shared-files registry of kind ``lora``, entries as 0.1 wrote them
    (every ``LoraInfo`` field, the object key in ``path``)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, "lora")

    def publish_lora(self, info: LoraInfo, storage: Storage) -> bool:
        """Store the file (once per hash) and register its name; True if the object was new."""
        if info.path is None:
            raise BadArgument(f"LoRA {info.name!r} has no local file to publish", field="FILE")
        new = self.store_once(info.path, info.sha256, storage)
        entry = asdict(replace(info, path=None, object_key=None)) | {"path": self.object_key(info.sha256)}
        entry.pop("object_key")
        self.redis.hset(self._hash, info.name, json.dumps(entry))
        return new

    def lookup_lora(self, name: str) -> LoraInfo | None:
        """The registered LoRA ``name`` (no local path; ``object_key`` set), or None."""
        raw = self.redis.hget(self._hash, name)
        if raw is None:
            return None
        entry = json.loads(raw)
        stored = entry.pop("object_key", None) or entry.get("path")  # the object key
        family = Family.parse(entry.pop("family", None))
        known = {f.name for f in fields(LoraInfo)}
        entry = {k: v for k, v in entry.items() if k in known}  # entries from newer versions may say more
        return LoraInfo(**entry | {"path": None, "object_key": stored, "family": family})
