"""The one LRU with pinning that every worker cache uses."""

from __future__ import annotations

from lorafleet.worker.lru import LRUCache


def test_the_least_recently_used_goes_first_when_over_the_count():
    evicted = []
    cache: LRUCache[str, int] = LRUCache(max_items=2, on_evict=lambda k, v: evicted.append(k))
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # b is now the least recently used
    assert cache.put("c", 3) == ["b"]
    assert cache.keys() == ["a", "c"] and evicted == ["b"]


def test_a_byte_budget_counts_each_entrys_size():
    cache: LRUCache[str, int] = LRUCache(max_bytes=10, size=lambda v: v)
    cache.put("a", 4)
    cache.put("b", 4)
    assert cache.put("c", 4) == ["a"] and cache.used_bytes == 8
    assert cache.make_room(incoming_bytes=6) == ["b"] and cache.keys() == ["c"]


def test_pinned_entries_are_spared_even_over_the_budget():
    cache: LRUCache[str, int] = LRUCache(max_items=1)
    cache.put("running", 1)
    with cache.pinned(["running"]):
        assert cache.put("next", 2) == []  # neither the pinned one nor the new one goes
        assert cache.keys() == ["running", "next"]
    assert cache.make_room() == ["running"]


def test_pins_nest_and_put_never_evicts_what_it_adds():
    cache: LRUCache[str, int] = LRUCache(max_bytes=5, size=lambda v: v)
    cache.pin("a")
    cache.pin("a")
    cache.put("a", 3)
    cache.unpin("a")
    assert cache.put("huge", 100) == []  # "a" still pinned once; the new entry stays
    cache.unpin("a")
    assert cache.make_room() == ["a", "huge"]  # once added, an oversized entry is fair game


def test_evict_drops_one_entry_now_and_reports_it():
    seen = []
    cache: LRUCache[str, int] = LRUCache(on_evict=lambda k, v: seen.append((k, v)))
    cache.put("a", 1)
    cache.pin("a")
    assert cache.evict("a") and not cache.evict("a")
    assert seen == [("a", 1)] and "a" not in cache and len(cache) == 0
