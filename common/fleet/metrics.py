"""Fleet-wide counters in Redis, read by the API.

The counters (``keys.STATS_*``) are written in the atomic step that ends a job
(fleet/lifecycle.py, ``end_effects``), as INCRBY / HINCRBYFLOAT, so any number of workers add
to them at once: jobs finished by status, seconds per phase (sum and count), LoRA cache hits
and misses, and images stored per minute (kept two hours).
"""

from __future__ import annotations

import time

import redis

from lorafleet.common.schema import keys


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
