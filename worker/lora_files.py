"""A job's LoRA as a file on this worker: the drop folder's, or fetched into the disk cache.

A name the worker's own ``autoimport/lora`` folder holds is that file. A name only the
shared registry knows is fetched from the object store into the disk cache
(``LORAFLEET_LORA_DISK_CACHE_DIR``), its sha256 checked, and kept there within
``LORAFLEET_LORA_DISK_CACHE_MB``: least recently used files go first, never one the
current job needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

from lorafleet.common.errors import JobFailed, LoraError, TransientError
from lorafleet.common.loras.catalog import LoraCatalog
from lorafleet.common.loras.files import SAFETENSORS_SUFFIX, LoraInfo
from lorafleet.common.retry import with_retries
from lorafleet.common.storage import Storage, write_atomic
from lorafleet.worker.lru import LRUCache

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
"""Tries to fetch a LoRA from the store before its job fails."""
PART_FILE_MAX_AGE = 3600.0
"""Seconds after which a half-written cache file is taken as a dead worker's and removed."""


class DiskCache:
    """LoRA files fetched from the store, by sha256, within a byte budget on disk.

    The order of use is the files' access times, so it survives a restart of the worker.
    """

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._files: LRUCache[str, int] = LRUCache(
            max_bytes=budget_bytes, size=lambda size: size, on_evict=self._delete
        )
        if self.folder.is_dir():
            self._sweep_parts()
            found = sorted(self.folder.glob(f"*{SAFETENSORS_SUFFIX}"), key=lambda p: p.stat().st_atime)
            for path in found:
                self._files.put(path.stem, path.stat().st_size)

    def _sweep_parts(self) -> None:
        """Remove the half-written files (``.part-*``) a killed worker left here long ago; a
        fresh one may be another worker's write in progress, so it stays."""
        cutoff = time.time() - PART_FILE_MAX_AGE
        for part in self.folder.glob(".part-*"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
                    logger.info("removed %s, left half-written by a worker that died", part.name)
            except OSError:
                pass

    @property
    def budget_bytes(self) -> int:
        return self._files.max_bytes

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}{SAFETENSORS_SUFFIX}"

    def get(self, sha256: str) -> Path | None:
        """The cached file, marked most recently used; None if it is not here."""
        path = self.path(sha256)
        with self._lock:
            if not path.is_file():
                self._files.evict(sha256) if sha256 in self._files else None
                return None
            self._files.get(sha256) if sha256 in self._files else self._files.put(sha256, path.stat().st_size)
            # The access time orders eviction after a restart; the modification time stays,
            # so the file's description (cached by size and mtime) stays valid.
            os.utime(path, (time.time(), path.stat().st_mtime))
        return path

    def put(self, sha256: str, data: bytes, pinned: set[str]) -> Path:
        """Write a fetched file and make room for it, sparing ``pinned`` hashes."""
        path = self.path(sha256)
        with self._lock:
            with self._files.pinned(set(pinned)):
                self._files.make_room(len(data))  # first: the folder never holds more than its budget
            write_atomic(path, data)
            with self._files.pinned(set(pinned) | {sha256}):
                self._files.put(sha256, len(data))
        return path

    def cached(self) -> list[str]:
        """Hashes of the files in the cache, least recently used first."""
        with self._lock:
            return self._files.keys()

    def _delete(self, sha256: str, size: int) -> None:
        self.path(sha256).unlink(missing_ok=True)
        logger.info("LoRA file cache evicted %s", sha256[:12])


class LoraFiles:
    """Finds each LoRA of a job as a local file, checked against the hash it had at submit."""

    def __init__(self, catalog: LoraCatalog, storage: Storage | None, cache: DiskCache | None) -> None:
        self.catalog = catalog
        self.storage = storage
        self.cache = cache

    def get(self, name: str, *, pinned: set[str] = frozenset()) -> LoraInfo:
        """The LoRA ``name`` with a local ``path``; LoraError or JobFailed say why not.

        ``pinned``: hashes the current job needs, which the disk cache must not evict.
        """
        info = self.catalog.get(name)
        if info.path is not None:
            return info
        if self.storage is None or self.cache is None or info.object_key is None:
            raise LoraError(
                f"LoRA {name!r} is registered but this worker has no object store to fetch it from"
            )
        path = self.cache.get(info.sha256) or self._fetch(info, pinned)
        try:
            local = self.catalog.describe(path)
        except FileNotFoundError:  # another worker process on this host evicted it just now
            local = self.catalog.describe(self._fetch(info, pinned))
        return replace(local, name=info.name, is_lcm=info.is_lcm)

    def _fetch(self, info: LoraInfo, pinned: set[str]) -> Path:
        assert self.storage is not None and self.cache is not None and info.object_key is not None
        return fetch_object(
            self.storage, self.cache, f"LoRA {info.name!r}", info.object_key, info.sha256, pinned
        )


def fetch_object(
    storage: Storage, cache: DiskCache, what: str, key: str, sha256: str, pinned: set[str] = frozenset()
) -> Path:
    """The registered file ``key`` on local disk: from the cache, else fetched from the store
    (TransientError retried), checked against ``sha256`` and cached; JobFailed says why not."""
    cached = cache.get(sha256)
    if cached is not None:
        return cached
    try:
        data = with_retries(f"fetch of {what}", lambda: storage.get(key), FETCH_ATTEMPTS)
    except TransientError as exc:
        raise JobFailed(
            f"{what} could not be fetched from {storage.describe()} after {FETCH_ATTEMPTS} tries: {exc}"
        ) from None
    except JobFailed as exc:
        raise JobFailed(
            f"{what} is registered but its file is missing from the store: {exc.message}; import it again"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise JobFailed(
            f"{what} fetched from {storage.describe()} has sha256 {digest[:12]}..., "
            f"not the registered {sha256[:12]}...: the stored object is corrupt; import it again"
        )
    logger.info("%s (%s) fetched from %s", what, sha256[:12], storage.describe())
    return cache.put(sha256, data, pinned)
