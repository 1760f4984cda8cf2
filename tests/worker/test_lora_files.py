"""The worker's LoRA files: fetched from a real store into a disk cache that keeps its
budget (least recently used first, never one the job needs), checked by hash."""

from __future__ import annotations

import os
import time

import pytest
import redis

from lorafleet.common.catalog.lora_files import describe_file
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.shared_files import LoraRegistry, object_key
from lorafleet.common.infra.storage import LocalStorage
from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lora.files import DiskCache, LoraFiles


@pytest.fixture
def fleet(redis_url, home, tmp_path):
    store = LocalStorage(tmp_path / "store")
    infos = [describe_file(p) for p in sorted((home / "autoimport" / "lora").glob("*.safetensors"))]
    registry = LoraRegistry(redis.Redis.from_url(redis_url))
    for info in infos:
        registry.publish_lora(info, store)
    budget = sum(sorted(i.size for i in infos)[-2:])  # room for the two largest files
    empty = tmp_path / "no-local-files"
    empty.mkdir()
    files = LoraFiles(LoraCatalog(empty, registry), store, DiskCache(tmp_path / "cache", budget))
    return files, infos, store


def _age(files: LoraFiles, sha256: str, seconds_ago: float) -> None:
    path = files.cache.path(sha256)
    os.utime(path, (time.time() - seconds_ago, path.stat().st_mtime))


def test_a_registered_lora_is_fetched_described_under_its_name_and_kept(fleet):
    files, infos, _ = fleet
    info = files.get(infos[0].name)
    assert info.path == files.cache.path(infos[0].sha256) and info.name == infos[0].name
    assert info.sha256 == infos[0].sha256 and files.cache.cached() == [infos[0].sha256]


def test_the_disk_cache_keeps_its_budget_dropping_the_least_recently_used_first(fleet):
    files, infos, _ = fleet
    first, second, third = infos[:3]
    for name in (first.name, second.name, first.name):  # now second is the least recently used
        files.get(name)
        files.cache.release()  # each its own job, over
    files.get(third.name, pinned={second.sha256})  # second is needed by the same job: kept
    cached = set(files.cache.cached())
    assert third.sha256 in cached and second.sha256 in cached and first.sha256 not in cached
    assert not files.cache.path(first.sha256).exists()
    files.cache.release()
    files.get(first.name)
    assert len(files.cache.cached()) <= 2
    total = sum(files.cache.path(sha).stat().st_size for sha in files.cache.cached())
    assert total <= files.cache.budget_bytes


def test_a_restarted_worker_orders_its_cache_by_the_files_access_times(fleet, tmp_path):
    files, infos, store = fleet
    first, second, third = infos[:3]
    files.get(first.name)
    files.get(second.name)
    files.cache.release()
    _age(files, first.sha256, 100)  # set times explicitly rather than sleeping to order them
    _age(files, second.sha256, 50)
    reopened = LoraFiles(files.catalog, store, DiskCache(files.cache.folder, files.cache.budget_bytes))
    assert reopened.cache.cached() == [first.sha256, second.sha256]
    reopened.get(third.name)
    assert first.sha256 not in reopened.cache.cached()


def test_a_corrupt_object_is_refused_and_never_cached(fleet):
    files, infos, store = fleet
    store.put(object_key(infos[0].sha256), b"garbage")
    with pytest.raises(JobFailed, match="the stored object is corrupt"):
        files.get(infos[0].name)
    assert files.cache.cached() == []


def test_a_missing_object_says_so_and_an_unreadable_store_does_not(fleet, tmp_path):
    files, infos, store = fleet
    (store.root / object_key(infos[0].sha256)).unlink()
    with pytest.raises(JobFailed, match="missing from the store"):
        files.get(infos[0].name)
    broken = tmp_path / "store-is-a-file"
    broken.write_text("not a folder")
    unreadable = LoraFiles(files.catalog, LocalStorage(broken), files.cache)
    with pytest.raises(JobFailed, match="could not be fetched .* after 3 tries") as caught:
        unreadable.get(infos[1].name)
    assert "missing from the store" not in str(caught.value)


def test_half_written_files_of_dead_workers_are_swept_and_fresh_ones_kept(tmp_path):
    import os
    import time

    from lorafleet.worker.lora.files import DiskCache

    folder = tmp_path / "cache"
    folder.mkdir()
    old, fresh = folder / ".part-old", folder / ".part-fresh"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y" * 10)
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    DiskCache(folder, 1024)
    assert not old.exists() and fresh.exists()


def test_room_is_made_before_a_file_is_written_so_the_budget_is_never_passed(tmp_path):
    folder = tmp_path / "cache"
    cache = DiskCache(folder, 100)
    peaks = []
    for name in "abc":
        with cache.writing(name * 64, pinned=set(), expected_bytes=60) as out:
            # while the file streams in, the folder holds what was there plus this file
            peaks.append(sum(p.stat().st_size for p in folder.glob("*.safetensors")) + 60)
            out.write(b"x" * 60)
        cache.release()  # the job that used it is over
    assert max(peaks) <= 100
    assert cache.cached() == ["c" * 64]


_HOLDER = """
import sys, time
from pathlib import Path
from lorafleet.worker.lora.files import DiskCache
cache = DiskCache(Path(sys.argv[1]), 10**9)
assert cache.get(sys.argv[2]) is not None
print("holding", flush=True)
sys.stdin.readline()
cache.release()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow  # real processes
def test_a_worker_never_evicts_a_file_another_worker_process_is_using(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "cache"
    first = DiskCache(folder, 100)
    first.put("a" * 64, b"a" * 60, pinned=set())
    first.release()
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder), "a" * 64],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "holding"
        second = DiskCache(folder, 100)  # a second worker sharing the folder, as compose sets it up
        second.put("b" * 64, b"b" * 60, pinned=set())  # over budget: "a" would go first
        assert first.path("a" * 64).read_bytes() == b"a" * 60  # the other worker's job still reads it
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "released"
        second.release()
        second.put("c" * 64, b"c" * 60, pinned=set())  # now nobody uses "a" or "b": they go
        assert not second.path("a" * 64).exists() and not second.path("b" * 64).exists()
    finally:
        other.kill()
        other.wait()


def test_a_fetch_streams_the_object_and_never_holds_it_whole_in_memory(fleet, tmp_path):
    import hashlib
    import tracemalloc

    from lorafleet.worker.lora.files import fetch_object

    _, _, store = fleet
    data = os.urandom(24 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    store.put("big/object", data)
    del data
    cache = DiskCache(tmp_path / "big-cache", 10**9)
    tracemalloc.start()
    try:
        path = fetch_object(store, cache, "a big file", "big/object", sha)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == 24 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, f"the fetch held {peak / 2**20:.0f} MiB at once"
