"""The shared-files registry against a real Redis and a store: one registry for LoRAs,
embeddings and VAEs, content-addressed objects, descriptions that come back whole, and
names that resolve through the catalog."""

from __future__ import annotations

import json

import pytest
import redis

from lorafleet.common.catalog.lora_files import describe_file
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.shared_files import LoraRegistry, SharedFiles, object_key
from lorafleet.common.infra.storage import LocalStorage
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import LoraError


@pytest.fixture
def shared(redis_url, home, tmp_path):
    store = LocalStorage(tmp_path / "store")
    infos = [describe_file(p) for p in sorted((home / "autoimport" / "lora").glob("*.safetensors"))]
    registry = LoraRegistry(redis.Redis.from_url(redis_url))
    for info in infos:
        registry.publish_lora(info, store)
    return registry, infos, store


def test_publish_stores_by_hash_and_lookup_gives_the_description_back(shared):
    registry, infos, store = shared
    assert registry.names() == sorted(i.name for i in infos)
    for info in infos:
        found = registry.lookup_lora(info.name)
        assert (
            found.sha256 == info.sha256
            and found.family is info.family
            and found.trigger_words == info.trigger_words
        )
        assert found.path is None and found.object_key == object_key(info.sha256)
        assert store.exists(object_key(info.sha256))
    assert registry.lookup_lora("nothing") is None


def test_entries_keep_the_layout_older_versions_read_and_newer_fields_are_tolerated(shared):
    registry, infos, _ = shared
    entry = json.loads(registry.redis.hget(keys.REGISTERED_LORAS, infos[0].name))
    assert entry["path"] == object_key(infos[0].sha256) and "object_key" not in entry  # as 0.1 wrote them
    registry.redis.hset(keys.REGISTERED_LORAS, infos[0].name, json.dumps(entry | {"from_the_future": 1}))
    assert registry.lookup_lora(infos[0].name).object_key == object_key(infos[0].sha256)


def test_the_catalog_prefers_the_folder_then_the_registry_and_one_error_says_neither(shared, tmp_path):
    registry, infos, _ = shared
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    catalog = LoraCatalog(empty, registry)
    assert catalog.get(infos[0].name).object_key == object_key(infos[0].sha256)
    with pytest.raises(LoraError, match="unknown LoRA 'nothing'") as caught:
        catalog.get("nothing")
    assert "lorafleet loras import" in str(caught.value)


def test_every_kind_shares_one_registry_each_in_its_own_hash_and_folder(shared, tmp_path):
    registry, infos, store = shared
    vaes = SharedFiles(registry.redis, "vae")
    path = infos[0].path
    vaes.publish("same-bytes", path, infos[0].sha256, {}, store)
    # the same bytes as a LoRA and as a VAE: two objects, two names, neither hides the other
    assert vaes.object_key(infos[0].sha256) != registry.object_key(infos[0].sha256)
    assert store.exists(vaes.object_key(infos[0].sha256))
    assert vaes.names() == ["same-bytes"] and "same-bytes" not in registry.names()
    before = registry.snapshot(infos[0].name)
    assert registry.remove(infos[0].name) and registry.lookup_lora(infos[0].name) is None
    registry.restore(infos[0].name, before)
    assert registry.lookup_lora(infos[0].name).sha256 == infos[0].sha256
    vaes.restore("same-bytes", None)
    assert vaes.lookup("same-bytes") is None
