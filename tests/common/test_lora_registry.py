"""The shared LoRA registry against a real Redis and a store: content-addressed objects,
a disk cache that keeps to its budget (least recently used first, never one in use)."""

from __future__ import annotations

import os
import time

import pytest
import redis

from lorafleet.common.errors import JobFailed
from lorafleet.common.lora_catalog import describe_file
from lorafleet.common.lora_registry import SharedLoras, object_key
from lorafleet.common.storage import LocalStorage


@pytest.fixture
def shared(redis_url, home, tmp_path):
    store = LocalStorage(tmp_path / "store")
    infos = [describe_file(p) for p in sorted((home / "autoimport" / "lora").glob("*.safetensors"))]
    budget = sum(sorted(i.size for i in infos)[-2:])  # room for the two largest files
    registry = SharedLoras(redis.Redis.from_url(redis_url), store, tmp_path / "cache", budget)
    for info in infos:
        registry.publish(info)
    return registry, infos, store


def test_publish_stores_by_hash_and_lookup_gives_the_description_back(shared):
    registry, infos, store = shared
    assert registry.names() == sorted(i.name for i in infos)
    for info in infos:
        found = registry.lookup(info.name)
        assert (
            found.sha256 == info.sha256
            and found.family == info.family
            and found.trigger_words == info.trigger_words
        )
        assert str(found.path) == object_key(info.sha256) and store.exists(object_key(info.sha256))
    assert registry.lookup("nothing") is None


def test_the_disk_cache_keeps_its_budget_dropping_the_least_recently_used_first(shared):
    registry, infos, _ = shared
    first, second, third = infos[:3]
    registry.fetch(first)
    time.sleep(0.01)
    registry.fetch(second)
    time.sleep(0.01)
    registry.fetch(first)  # now second is the least recently used
    time.sleep(0.01)
    registry.fetch(third, in_use={second.sha256})  # second is needed by the same job: kept
    cached = set(registry.cached())
    assert third.sha256 in cached and second.sha256 in cached and first.sha256 not in cached
    registry.fetch(first)
    assert (
        set(registry.cached()) <= {first.sha256, third.sha256, second.sha256} and len(registry.cached()) <= 2
    )
    total = sum(os.path.getsize(registry.cache_dir / f"{sha}.safetensors") for sha in registry.cached())
    assert total <= registry.cache_bytes


def test_a_corrupt_object_is_refused_and_never_cached(shared):
    registry, infos, store = shared
    store.put(object_key(infos[0].sha256), b"garbage")
    with pytest.raises(JobFailed, match="the stored object is corrupt"):
        registry.fetch(infos[0])
    assert registry.cached() == []
