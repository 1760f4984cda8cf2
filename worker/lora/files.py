"""A job's LoRA as a file on this worker: the drop folder's, or fetched into the disk cache.

A name the worker's own ``autoimport/lora`` folder holds is that file. A name only the
shared registry knows is fetched from the object store into the disk cache
(``LORAFLEET_LORA_DISK_CACHE_DIR``), its sha256 checked, and kept there within
``LORAFLEET_LORA_DISK_CACHE_MB``: least recently used files go first, never one the
current job needs.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, LoraInfo
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.infra.retry import with_retries
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.errors import JobFailed, LoraError, ObjectMissing, TransientError
from lorafleet.worker.lru import LRUCache

logger = logging.getLogger(__name__)

FETCH_ATTEMPTS = 3
"""Tries to fetch a LoRA from the store before its job fails."""
PART_FILE_MAX_AGE = 3600.0
"""Seconds after which a half-written cache file is taken as a dead worker's and removed."""


class DiskCache:
    """LoRA files fetched from the store, by sha256, within a byte budget on disk.

    The order of use is the files' access times, so it survives a restart of the worker.
    Several worker processes may share the folder (as docker compose sets it up): a process
    holds a shared file lock on each file it uses until ``release`` (at the end of its
    job), and deletes a file only under an exclusive lock it gets without waiting, so one
    worker never evicts a file another is using; such a file stays until it is free.
    """

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._kept: dict[str, int] = {}
        """Files eviction had to leave (in use): counted again before room is next made."""
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
        """The cached file, marked most recently used and held until ``release``; None if it
        is not here."""
        path = self.path(sha256)
        with self._lock:
            if not self._hold(sha256, path):
                self._files.evict(sha256) if sha256 in self._files else None
                return None
            self._files.get(sha256) if sha256 in self._files else self._files.put(sha256, path.stat().st_size)
            # The access time orders eviction after a restart; the modification time stays,
            # so the file's description (cached by size and mtime) stays valid.
            os.utime(path, (time.time(), path.stat().st_mtime))
        return path

    @contextmanager
    def writing(self, sha256: str, pinned: set[str], expected_bytes: int = 0) -> Iterator[BinaryIO]:
        """A file to stream a fetched object into; when the block ends without an error it
        becomes the cached file for ``sha256`` (held until ``release``), else it is removed.
        Room is made first (for ``expected_bytes``, then for the real size), sparing
        ``pinned`` hashes, so the folder never holds more than its budget."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._make_room(expected_bytes, pinned)
        fd, part = tempfile.mkstemp(dir=self.folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
            size = os.stat(part).st_size
            path = self.path(sha256)
            with self._lock:
                self._make_room(size, pinned)
                os.replace(part, path)
                with self._files.pinned(set(pinned) | {sha256}):
                    self._files.put(sha256, size)
                self._hold(sha256, path)
        finally:
            Path(part).unlink(missing_ok=True)

    def put(self, sha256: str, data: bytes, pinned: set[str]) -> Path:
        """Cache ``data`` as the file for ``sha256``, sparing ``pinned`` hashes."""
        with self.writing(sha256, pinned, len(data)) as out:
            out.write(data)
        return self.path(sha256)

    def release(self) -> None:
        """Let go of every file this process holds (its job is over): others may evict them."""
        with self._lock:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()

    def cached(self) -> list[str]:
        """Hashes of the files in the cache, least recently used first."""
        with self._lock:
            return self._files.keys()

    def _make_room(self, incoming_bytes: int, pinned: set[str]) -> None:
        """Evict until ``incoming_bytes`` fit (under ``self._lock``), sparing ``pinned``."""
        kept, self._kept = self._kept, {}
        for sha256, size in kept.items():
            if sha256 not in self._files and self.path(sha256).is_file():
                self._files.put(sha256, size)
        with self._files.pinned(set(pinned)):
            self._files.make_room(incoming_bytes)

    def _hold(self, sha256: str, path: Path) -> bool:
        """Take a shared lock on the file (under ``self._lock``); False if it is gone."""
        if sha256 in self._held:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        # Waits only while another process deletes this very file, then sees it gone.
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        self._held[sha256] = fd
        return True

    def _delete(self, sha256: str, size: int) -> None:
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._kept[sha256] = size
            logger.info("LoRA file cache kept %s: a worker is using it", sha256[:12])
        else:
            path.unlink(missing_ok=True)
            logger.info("LoRA file cache evicted %s", sha256[:12])
        finally:
            os.close(fd)


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
        local = self.catalog.describe(path)  # held: no other worker evicts it meanwhile
        return replace(local, name=info.name, is_lcm=info.is_lcm)

    def _fetch(self, info: LoraInfo, pinned: set[str]) -> Path:
        assert self.storage is not None and self.cache is not None and info.object_key is not None
        return fetch_object(
            self.storage, self.cache, f"LoRA {info.name!r}", info.object_key, info.sha256, pinned, info.size
        )


def fetch_object(
    storage: Storage,
    cache: DiskCache,
    what: str,
    key: str,
    sha256: str,
    pinned: set[str] = frozenset(),
    expected_bytes: int = 0,
) -> Path:
    """The registered file ``key`` on local disk: from the cache, else streamed from the
    store into the cache (TransientError retried), checked against ``sha256`` on the way;
    JobFailed says why not. The file is held until ``cache.release()``."""
    cached = cache.get(sha256)
    if cached is not None:
        return cached

    def download() -> Path:
        with cache.writing(sha256, set(pinned), expected_bytes) as out:
            hashing = _Hashing(out)
            storage.download(key, hashing)
            digest = hashing.hexdigest()
            if digest != sha256:
                raise JobFailed(
                    f"{what} fetched from {storage.describe()} has sha256 {digest[:12]}..., "
                    f"not the registered {sha256[:12]}...: the stored object is corrupt; import it again"
                )
        return cache.path(sha256)

    try:
        path = with_retries(f"fetch of {what}", download, FETCH_ATTEMPTS)
    except TransientError as exc:
        raise JobFailed(
            f"{what} could not be fetched from {storage.describe()} after {FETCH_ATTEMPTS} tries: {exc}"
        ) from None
    except ObjectMissing as exc:
        raise JobFailed(
            f"{what} is registered but its file is missing from the store: {exc.message}; import it again"
        ) from None
    logger.info("%s (%s) fetched from %s", what, sha256[:12], storage.describe())
    return path


class _Hashing:
    """A file object that hashes what is written through it."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._sha = hashlib.sha256()

    def write(self, chunk: bytes) -> int:
        self._sha.update(chunk)
        return self._out.write(chunk)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()
