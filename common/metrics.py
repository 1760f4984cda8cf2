"""Fleet-wide counters in Redis, written by workers as jobs end, read by the API.

Keys::

    lorafleet:stats:finished          hash  status -> jobs that ended so
    lorafleet:stats:phases            hash  "<phase>:sum" / "<phase>:count" -> seconds / jobs
    lorafleet:stats:lora              hash  hits / misses
    lorafleet:stats:images:<minute>   int   images stored in that minute (epoch minutes); 2 h TTL

All of it is counters (INCRBY / HINCRBYFLOAT), so any number of workers add to it at once.
"""

from __future__ import annotations

import time

import redis

from lorafleet.common.jobs import JobRecord
from lorafleet.common.state import PREFIX

FINISHED_KEY = PREFIX + "stats:finished"
PHASES_KEY = PREFIX + "stats:phases"
LORA_KEY = PREFIX + "stats:lora"
IMAGES_KEY = PREFIX + "stats:images:"
IMAGES_TTL = 2 * 3600
PHASES = ("queue_wait", "pipeline_load", "lora_load", "lora_apply", "sampling", "restore", "upload", "total")


def record_finished(client: redis.Redis, record: JobRecord, now: float | None = None) -> None:
    """Count a job that has just ended."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(FINISHED_KEY, record.status.value, 1)
    for phase in PHASES:
        value = getattr(record.timings, phase)
        if value is not None:
            pipe.hincrbyfloat(PHASES_KEY, f"{phase}:sum", value)
            pipe.hincrby(PHASES_KEY, f"{phase}:count", 1)
    if record.timings.lora_hits:
        pipe.hincrby(LORA_KEY, "hits", record.timings.lora_hits)
    if record.timings.lora_misses:
        pipe.hincrby(LORA_KEY, "misses", record.timings.lora_misses)
    if record.images:
        key = f"{IMAGES_KEY}{int(now // 60)}"
        pipe.incrby(key, len(record.images))
        pipe.expire(key, IMAGES_TTL)
    pipe.execute()


def images_per_minute(
    client: redis.Redis, minutes: int = 60, now: float | None = None
) -> list[tuple[int, int]]:
    """(epoch minute, images stored) for each of the last ``minutes`` minutes, oldest first."""
    now = time.time() if now is None else now
    current = int(now // 60)
    stamps = list(range(current - minutes + 1, current + 1))
    values = client.mget([f"{IMAGES_KEY}{m}" for m in stamps])
    return [(m, int(v or 0)) for m, v in zip(stamps, values)]


def totals(client: redis.Redis) -> dict[str, dict[str, float]]:
    """The counters as plain dicts: finished by status, phase sums and counts, LoRA cache."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(FINISHED_KEY)
    pipe.hgetall(PHASES_KEY)
    pipe.hgetall(LORA_KEY)
    finished, phases, lora = pipe.execute()

    def decode(raw: dict) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in raw.items()}

    return {"finished": decode(finished), "phases": decode(phases), "lora": decode(lora)}
