"""Worker heartbeats in Redis: who is serving what, right now.

Every worker writes a WorkerBeat every HEARTBEAT_SECONDS into one Redis hash
(``keys.WORKERS``, field = worker name) and, in the same round trip, sets
``keys.worker_alive(name)`` to its instance, to expire FORGET_AFTER seconds later. Readers
judge a worker by the age of its last beat, read from that key's TTL: Redis's own clock,
so clocks that differ between machines never make a live worker look lost or a dead one
alive. ``alive`` under STALE_AFTER, ``stale`` under GONE_AFTER, then ``gone``; a worker
unseen for FORGET_AFTER is dropped from the hash. A worker that stops cleanly removes
itself at once.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal

import redis
from pydantic import BaseModel

from lorafleet.common.fleet.queue import queue_depths
from lorafleet.common.schema import keys

HEARTBEAT_SECONDS = 2.0
"""How often a worker beats."""
STALE_AFTER = 10.0
"""Seconds without a beat after which a worker is shown stale."""
GONE_AFTER = 60.0
"""Seconds without a beat after which a worker is gone (it died or lost the network)."""
FORGET_AFTER = 3600.0
"""Seconds after which a gone worker is no longer listed."""

Liveness = Literal["alive", "stale", "gone"]

ALIVE_FOLDER = "run"
"""Under the home folder: one file per worker process on this machine, touched at every
beat whether or not Redis took it (``workers check`` falls back to it when Redis is away, so
a Redis outage does not make every worker's liveness probe fail)."""


def alive_file(home: Path, name: str) -> Path:
    return Path(home) / ALIVE_FOLDER / (re.sub(r"[^A-Za-z0-9@._-]", "_", name) + ".alive")


def locally_alive(home: Path, name: str | None, within: float = STALE_AFTER) -> list[str]:
    """Worker processes of this machine (or the one called ``name``) that beat in the last
    ``within`` seconds by their alive files."""
    folder = Path(home) / ALIVE_FOLDER
    if not folder.is_dir():
        return []
    now = time.time()
    files = [alive_file(home, name)] if name else sorted(folder.glob("*.alive"))
    return [f.stem for f in files if f.is_file() and now - f.stat().st_mtime < within]


class WorkerBeat(BaseModel):
    """What one worker says about itself."""

    name: str
    instance: str = ""
    """This worker process's id (a restarted worker with the same name has a new one)."""
    host: str
    pid: int
    version: str
    device: str
    device_memory_used: int | None = None
    device_memory_total: int | None = None
    models: list[str] = []
    queues: list[str] = []
    hot_pipelines: list[str] = []
    cached_loras: list[str] = []
    current_job: str | None = None
    current_step: int = 0
    current_total: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    lora_hits: int = 0
    lora_misses: int = 0
    lora_hit_rate: float | None = None
    switch_p50: float | None = None
    max_batch: int = 1
    """Images per sampling call at the size of its last job (LORAFLEET_MAX_BATCH, or derived
    from the free device memory; halved where it ran out of memory)."""
    started_at: float
    last_seen: float


class WorkerView(WorkerBeat):
    """A beat as a reader sees it: with its liveness and the seconds since it was written."""

    liveness: Liveness
    age: float


def liveness(age: float) -> Liveness:
    if age < STALE_AFTER:
        return "alive"
    if age < GONE_AFTER:
        return "stale"
    return "gone"


class WorkerRegistry:
    """Writes and reads worker heartbeats."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def beat(self, beat: WorkerBeat) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.WORKERS, beat.name, beat.model_dump_json())
        pipe.set(keys.worker_alive(beat.name), beat.instance, ex=int(FORGET_AFTER))
        pipe.execute()

    def remove(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(keys.WORKERS, name)
        pipe.delete(keys.worker_alive(name))
        pipe.execute()

    def _ages(self, names: list[str]) -> dict[str, tuple[str | None, float]]:
        """Name -> (the instance that last beat, seconds since), on Redis's clock; an expired
        or missing beat is FORGET_AFTER old."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.get(keys.worker_alive(name))
            pipe.pttl(keys.worker_alive(name))
        replies = pipe.execute()
        ages = {}
        for name, instance, ttl in zip(names, replies[::2], replies[1::2]):
            if instance is None or ttl is None or ttl < 0:
                ages[name] = (None, FORGET_AFTER)
            else:
                ages[name] = (instance.decode(), max(0.0, FORGET_AFTER - ttl / 1000))
        return ages

    def all(self) -> list[WorkerView]:
        """Every known worker, alive first, then by name; forgotten ones are dropped."""
        beats = {
            (n.decode() if isinstance(n, bytes) else n): WorkerBeat.model_validate_json(raw)
            for n, raw in self.redis.hgetall(keys.WORKERS).items()
        }
        ages = self._ages(list(beats))
        views, forgotten = [], []
        for name, beat in beats.items():
            age = ages[name][1]
            if age >= FORGET_AFTER:
                forgotten.append(name)
                continue
            views.append(WorkerView(**beat.model_dump(), liveness=liveness(age), age=age))
        if forgotten:
            self.redis.hdel(keys.WORKERS, *forgotten)
        order = {"alive": 0, "stale": 1, "gone": 2}
        return sorted(views, key=lambda v: (order[v.liveness], v.name))

    def owner_alive(self, name: str | None, instance: str | None, within: float) -> bool:
        """Whether worker process ``instance`` called ``name`` beat in the last ``within`` s."""
        if not name:
            return False
        beat_instance, age = self._ages([name])[name]
        return beat_instance == instance and age < within

    def live_models(self) -> set[str]:
        """Model keys that at least one live worker serves."""
        return {model for w in self.all() if w.liveness == "alive" for model in w.models}


class QueueView(BaseModel):
    """One base model's queue: jobs waiting by priority step, and who serves it."""

    model: str
    queue: str
    depth: int
    by_priority: dict[str, int]
    workers: list[str]
    stale_workers: list[str]


def queue_views(client: redis.Redis, model_keys: set[str], workers: list[WorkerView]) -> list[QueueView]:
    """The queues of ``model_keys`` and of every model a worker serves, by model key."""
    models = sorted(set(model_keys).union(*(w.models for w in workers)))
    depths = queue_depths(client, [keys.queue(m) for m in models])
    views = []
    for model in models:
        steps = depths[keys.queue(model)]
        serving = [w for w in workers if model in w.models]
        views.append(
            QueueView(
                model=model,
                queue=keys.queue(model),
                depth=sum(steps.values()),
                by_priority={str(step): steps[step] for step in keys.PRIORITY_STEPS},
                workers=[w.name for w in serving if w.liveness == "alive"],
                stale_workers=[w.name for w in serving if w.liveness == "stale"],
            )
        )
    return views
