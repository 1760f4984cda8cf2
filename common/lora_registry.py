"""LoRAs shared across machines: files in the object store by sha256, names in Redis.

`lorafleet loras import FILE` checks the file, stores it once under
``loras/<sha256>.safetensors`` in the configured storage (the same store as the images) and
registers its name in the Redis hash ``lorafleet:loras`` with what the producer needs to
resolve a job without the file: family, format, rank, trigger words, size, hash.

A worker on any machine that meets a registered name it has no local file for fetches the
object into its disk cache (``LORAFLEET_LORA_DISK_CACHE_DIR``), checks the sha256, and
keeps it there within ``LORAFLEET_LORA_DISK_CACHE_MB``, dropping the least recently used
files first, never one in use. The local autoimport folder still wins for a name it holds,
as the seed's drop folder promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import redis

from lorafleet.common.errors import JobFailed, TransientError
from lorafleet.common.lora_catalog import SAFETENSORS_SUFFIX, LoraInfo
from lorafleet.common.settings import Settings
from lorafleet.common.state import PREFIX
from lorafleet.common.storage import Storage, check_key

LORAS_KEY = PREFIX + "loras"
FETCH_ATTEMPTS = 3
"""Tries to fetch a LoRA from the store before its job fails."""


def object_key(sha256: str) -> str:
    return check_key(f"loras/{sha256}{SAFETENSORS_SUFFIX}")


class SharedLoras:
    """The Redis side of the registry, plus (on a worker) the store and the disk cache."""

    def __init__(
        self,
        client: redis.Redis,
        storage: Storage | None = None,
        cache_dir: Path | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.redis = client
        self.storage = storage
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()

    @classmethod
    def for_machine(cls, settings: Settings, client: redis.Redis, storage: Storage) -> SharedLoras:
        """The registry with this machine's store and disk cache (what fetching needs)."""
        return cls(client, storage, settings.lora_cache_dir, settings.lora_disk_cache_mb << 20)

    # ------------------------------------------------------------------ registry
    def publish(self, info: LoraInfo) -> bool:
        """Store the file (once per hash) and register its name; True if the object was new."""
        assert self.storage is not None
        key = object_key(info.sha256)
        new = not self.storage.exists(key)
        if new:
            self.storage.put(key, info.path.read_bytes(), "application/octet-stream")
        entry = asdict(info) | {"path": key}
        self.redis.hset(LORAS_KEY, info.name, json.dumps(entry))
        return new

    def lookup(self, name: str) -> LoraInfo | None:
        """The registered LoRA ``name`` (its path is the object key), or None."""
        raw = self.redis.hget(LORAS_KEY, name)
        if raw is None:
            return None
        entry = json.loads(raw)
        return LoraInfo(**entry | {"path": Path(entry["path"])})

    def names(self) -> list[str]:
        return sorted(n.decode() for n in self.redis.hkeys(LORAS_KEY))

    # ------------------------------------------------------------------ worker side
    def fetch(self, info: LoraInfo, in_use: set[str] = frozenset()) -> Path:
        """The registered file on local disk: from the cache, or fetched and checked.

        ``in_use`` holds the hashes the current job needs, which eviction leaves alone.
        """
        assert self.storage is not None and self.cache_dir is not None
        path = self.cache_dir / f"{info.sha256}{SAFETENSORS_SUFFIX}"
        with self._lock:
            if path.is_file():
                # Most recently used: the access time orders eviction; the modification time
                # stays, so the file's description (cached by size and mtime) stays valid.
                os.utime(path, (time.time(), path.stat().st_mtime))
                return path
        data = self._download(info)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise JobFailed(
                f"LoRA {info.name!r} fetched from {self.storage.describe()} has sha256 {digest[:12]}..., "
                f"not the registered {info.sha256[:12]}...: the stored object is corrupt; import it again"
            )
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".fetch-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self._evict(keep=set(in_use) | {info.sha256})
        return path

    def _download(self, info: LoraInfo) -> bytes:
        assert self.storage is not None
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                return self.storage.get(object_key(info.sha256))
            except TransientError as exc:
                if attempt == FETCH_ATTEMPTS:
                    raise JobFailed(
                        f"LoRA {info.name!r} could not be fetched from {self.storage.describe()} "
                        f"after {FETCH_ATTEMPTS} tries: {exc}"
                    ) from None
                time.sleep(attempt)
            except JobFailed as exc:
                raise JobFailed(
                    f"LoRA {info.name!r} is registered but its file is missing from the store: "
                    f"{exc.message}; import it again"
                ) from None
        raise AssertionError("unreachable")

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently used cached files until the cache fits its budget."""
        assert self.cache_dir is not None
        with self._lock:
            files = [(p.stat().st_atime, p) for p in self.cache_dir.glob(f"*{SAFETENSORS_SUFFIX}")]
            total = sum(p.stat().st_size for _, p in files)
            for _, path in sorted(files):
                if total <= self.cache_bytes:
                    break
                if path.stem in keep:
                    continue
                total -= path.stat().st_size
                path.unlink(missing_ok=True)

    def cached(self) -> list[str]:
        """Hashes of the files in the disk cache."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        return sorted(p.stem for p in self.cache_dir.glob(f"*{SAFETENSORS_SUFFIX}"))
