"""The worker's LoRA files: fetched from a real store into a disk cache that keeps its
budget (least recently used first, never one the job needs), checked by hash."""

from __future__ import annotations

import os
import time

import pytest
import redis

from lorafleet.common.errors import JobFailed
from lorafleet.common.loras.catalog import LoraCatalog
from lorafleet.common.loras.files import describe_file
from lorafleet.common.loras.registry import LoraRegistry, object_key
from lorafleet.common.storage import LocalStorage
from lorafleet.worker.lora_files import DiskCache, LoraFiles


@pytest.fixture
def fleet(redis_url, home, tmp_path):
    store = LocalStorage(tmp_path / "store")
    infos = [describe_file(p) for p in sorted((home / "autoimport" / "lora").glob("*.safetensors"))]
    registry = LoraRegistry(redis.Redis.from_url(redis_url))
    for info in infos:
        registry.publish(info, store)
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
    files.get(first.name)
    files.get(second.name)
    files.get(first.name)  # now second is the least recently used
    files.get(third.name, pinned={second.sha256})  # second is needed by the same job: kept
    cached = set(files.cache.cached())
    assert third.sha256 in cached and second.sha256 in cached and first.sha256 not in cached
    assert not files.cache.path(first.sha256).exists()
    files.get(first.name)
    assert len(files.cache.cached()) <= 2
    total = sum(files.cache.path(sha).stat().st_size for sha in files.cache.cached())
    assert total <= files.cache.budget_bytes


def test_a_restarted_worker_orders_its_cache_by_the_files_access_times(fleet, tmp_path):
    files, infos, store = fleet
    first, second, third = infos[:3]
    files.get(first.name)
    files.get(second.name)
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

    from lorafleet.worker.lora_files import DiskCache

    folder = tmp_path / "cache"
    folder.mkdir()
    old, fresh = folder / ".part-old", folder / ".part-fresh"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"y" * 10)
    long_ago = time.time() - 2 * 3600
    os.utime(old, (long_ago, long_ago))
    DiskCache(folder, 1024)
    assert not old.exists() and fresh.exists()


def test_room_is_made_before_a_file_is_written_so_the_budget_is_never_passed(tmp_path, monkeypatch):
    import lorafleet.worker.lora_files as lora_files

    folder = tmp_path / "cache"
    cache = lora_files.DiskCache(folder, 100)
    peaks = []
    write = lora_files.write_atomic

    def measuring(path, data):  # lorafleet's own writer, watched: how full is the folder now?
        peaks.append(sum(p.stat().st_size for p in folder.glob("*.safetensors")) + len(data))
        write(path, data)

    monkeypatch.setattr(lora_files, "write_atomic", measuring)
    for name in "abc":
        cache.put(name * 64, b"x" * 60, pinned=set())
    assert max(peaks) <= 100
    assert cache.cached() == ["c" * 64]
