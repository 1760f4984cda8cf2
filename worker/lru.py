"""One least-recently-used cache with pinning, for every cache a worker keeps.

The hot pipelines, the parsed LoRAs and the LoRA files on disk all follow the same rule:
entries are kept in order of use; when the cache is over its budget (a count, a byte size,
or both), the least recently used entry goes first; a pinned entry never goes (the
pipeline a job is running on, the LoRAs of the job's own stack). vLLM's LoRA manager names
the same verbs.

Semantics: with ``max_items`` = 0 or ``max_bytes`` = 0 that limit is off. ``put`` and
``make_room`` evict unpinned entries, oldest first, until the entries (plus the room asked
for) fit, or until only pinned entries are left: pinning wins over the budget, and ``put``
never evicts the entry it adds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Values by key, least recently used first out, pinned entries spared."""

    def __init__(
        self,
        *,
        max_items: int = 0,
        max_bytes: int = 0,
        size: Callable[[V], int] = lambda value: 0,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size
        self._on_evict = on_evict
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._pins: dict[K, int] = {}

    # ------------------------------------------------------------------ reading
    def get(self, key: K) -> V | None:
        """The value, marked most recently used; None if absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        return list(self._entries)

    def values(self) -> list[V]:
        return list(self._entries.values())

    @property
    def used_bytes(self) -> int:
        return sum(self._size(v) for v in self._entries.values())

    # ------------------------------------------------------------------ writing
    def put(self, key: K, value: V) -> list[K]:
        """Add (or replace) an entry as most recently used; returns the keys evicted for it.

        The new entry itself is never among them: it is what the room was made for.
        """
        self._entries[key] = value
        self._entries.move_to_end(key)
        with self.pinned([key]):
            return self.make_room()

    def evict(self, key: K) -> bool:
        """Drop one entry now, pinned or not; False if it was not there."""
        value = self._entries.pop(key, None)
        if value is None:
            return False
        self._pins.pop(key, None)
        if self._on_evict:
            self._on_evict(key, value)
        return True

    def pin(self, key: K) -> None:
        """Spare ``key`` from eviction until it is unpinned as often as it was pinned."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        count = self._pins.get(key, 0) - 1
        if count > 0:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    @contextmanager
    def pinned(self, keys: Iterable[K]):
        """Pin ``keys`` for the block (a job's pipeline, its stack)."""
        held = list(keys)
        for key in held:
            self.pin(key)
        try:
            yield
        finally:
            for key in held:
                self.unpin(key)

    def make_room(self, incoming_bytes: int = 0, incoming_items: int = 0) -> list[K]:
        """Evict unpinned entries, oldest first, until the cache plus what comes fits."""
        evicted = []
        while self._over(incoming_bytes, incoming_items):
            victim = next((k for k in self._entries if k not in self._pins), None)
            if victim is None:
                break
            self.evict(victim)
            evicted.append(victim)
        return evicted

    def _over(self, incoming_bytes: int, incoming_items: int) -> bool:
        if not self._entries:
            return False
        if self.max_items and len(self._entries) + incoming_items > self.max_items:
            return True
        return bool(self.max_bytes) and self.used_bytes + incoming_bytes > self.max_bytes
