"""Embeddings and VAEs shared across machines, as LoRAs are: objects by sha256, names in Redis.

`lorafleet embeddings import FILE` and `lorafleet vaes import FILE` store the file once under
``<kind>/<sha256>.safetensors`` in the object store (the images' store) and register its name
with what a producer needs to check a job without the file (``meta``: an embedding's vector
count and widths). A worker without a local file of that name fetches the object into its
disk cache and checks its sha256 (``lorafleet.worker.lora.files``). A file in a machine's own
autoimport folder wins for its name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX
from lorafleet.common.infra.storage import Storage, check_key
from lorafleet.common.schema import keys

Kind = Literal["embedding", "vae"]
_WHERE = {"embedding": (keys.REGISTERED_EMBEDDINGS, "embeddings"), "vae": (keys.REGISTERED_VAES, "vaes")}


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
        self._hash, self._folder = _WHERE[kind]

    def object_key(self, sha256: str) -> str:
        return check_key(f"{self._folder}/{sha256}{SAFETENSORS_SUFFIX}")

    def publish(self, name: str, path: Path, sha256: str, meta: dict, storage: Storage) -> SharedFile:
        """Store the file (once per hash) and register its name for every machine."""
        shared = SharedFile(name, sha256, self.object_key(sha256), path.stat().st_size, meta)
        if not storage.exists(shared.object_key):
            storage.put(shared.object_key, path.read_bytes(), "application/octet-stream")
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

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.hkeys(self._hash))
