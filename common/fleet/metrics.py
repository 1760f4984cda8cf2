"""Fleet-wide counters in Redis, written by workers as jobs end, read by the API.

The counters (``keys.STATS_*``) are INCRBY / HINCRBYFLOAT, so any number of workers add to
them at once: jobs finished by status, seconds per phase (sum and count), LoRA cache hits
and misses, and images stored per minute (kept two hours).
"""

from __future__ import annotations

import time

import redis

from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import PHASES, JobRecord
from lorafleet.common.services import sweeps
from lorafleet.common.services.webhooks import job_ended


def record_finished(client: redis.Redis, record: JobRecord, now: float | None = None) -> None:
    """Count a job that has just ended, and queue its webhook event if it names one."""
    now = time.time() if now is None else now
    job_ended(client, record)
    sweeps.job_ended(client, record.job.batch_id, record.job_id)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(keys.STATS_FINISHED, record.status.value, 1)
    for phase in PHASES:
        value = getattr(record.timings, phase)
        if value is not None:
            pipe.hincrbyfloat(keys.STATS_PHASES, f"{phase}:sum", value)
            pipe.hincrby(keys.STATS_PHASES, f"{phase}:count", 1)
    if record.timings.lora_hits:
        pipe.hincrby(keys.STATS_LORA, "hits", record.timings.lora_hits)
    if record.timings.lora_misses:
        pipe.hincrby(keys.STATS_LORA, "misses", record.timings.lora_misses)
    if record.images:
        for key in (
            keys.images_in_minute(int(now // 60)),
            keys.model_images_in_minute(record.job.model, int(now // 60)),
        ):
            pipe.incrby(key, len(record.images))
            pipe.expire(key, keys.STATS_IMAGES_TTL)
    pipe.execute()


def images_per_minute(
    client: redis.Redis, minutes: int = 60, now: float | None = None
) -> list[tuple[int, int]]:
    """(epoch minute, images stored) for each of the last ``minutes`` minutes, oldest first."""
    now = time.time() if now is None else now
    current = int(now // 60)
    stamps = list(range(current - minutes + 1, current + 1))
    values = client.mget([keys.images_in_minute(m) for m in stamps])
    return [(m, int(v or 0)) for m, v in zip(stamps, values)]


def totals(client: redis.Redis) -> dict[str, dict[str, float]]:
    """The counters as plain dicts: finished by status, phase sums and counts, LoRA cache."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.STATS_FINISHED)
    pipe.hgetall(keys.STATS_PHASES)
    pipe.hgetall(keys.STATS_LORA)
    finished, phases, lora = pipe.execute()

    def decode(raw: dict) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in raw.items()}

    return {"finished": decode(finished), "phases": decode(phases), "lora": decode(lora)}
