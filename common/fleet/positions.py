"""Where a queued job stands: its position in its model's queue and an estimate of its start.

The position is the number of messages Celery would deliver before the job's own: those of
the higher priority steps of its model's queue (their list lengths), then those ahead of it
in its own step's list (read from the delivering end in chunks, at most SCAN_LIMIT). The
estimate divides the images ahead of it (and its own) by the images per second the fleet
stored for that model over the last RATE_MINUTES; none without recent throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from lorafleet.common.fleet.queue import PRIORITY_VALUE, message_job
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobRecord, JobStatus

SCAN_LIMIT = 10_000
"""Messages of its own list read at most to find a job; past it the position is a floor."""
CHUNK = 500
RATE_MINUTES = 10
"""The window of the throughput an estimate divides by."""


@dataclass(frozen=True)
class Standing:
    position: int
    """Messages ahead of the job (0: it is next)."""
    exact: bool
    """False when the job was not found within SCAN_LIMIT messages (position is then a floor)."""
    eta_seconds: float | None
    """When it should start (and end), from recent throughput; None without any."""


def model_rate(client: redis.Redis, model: str, now: float | None = None) -> float | None:
    """Images per second stored for ``model`` over the last RATE_MINUTES (None: none stored)."""
    now = time.time() if now is None else now
    minute = int(now // 60)
    counts = client.mget([keys.model_images_in_minute(model, minute - m) for m in range(RATE_MINUTES)])
    total = sum(int(c) for c in counts if c)
    return total / (RATE_MINUTES * 60) if total else None


def standing(client: redis.Redis, record: JobRecord) -> Standing | None:
    """The queued job's position and estimate; None for a job that is not queued."""
    if record.status is not JobStatus.queued:
        return None
    lists = keys.priority_lists(record.queue)
    own_step = PRIORITY_VALUE[record.job.priority]
    own = lists[keys.PRIORITY_STEPS.index(own_step)]
    ahead = sum(client.llen(key) for key in lists[: keys.PRIORITY_STEPS.index(own_step)])
    found, scanned = False, 0
    while scanned < SCAN_LIMIT:
        chunk = client.lrange(own, -(scanned + CHUNK), -(scanned + 1))  # the delivering end first
        if not chunk:
            break
        for raw in reversed(chunk):
            if (message_job(raw) or ("",))[0] == record.job_id:
                found = True
                break
            scanned += 1
        if found or len(chunk) < CHUNK:
            break
    position = ahead + scanned
    rate = model_rate(client, record.job.model)
    eta = None if rate is None else (position + 1) * record.job.num_images / rate
    return Standing(position=position, exact=found, eta_seconds=eta)
