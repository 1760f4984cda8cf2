"""/metrics in the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

from collections.abc import Iterable

import redis

from lorafleet.common.jobs import PHASES, JobStatus
from lorafleet.common.metrics import images_per_minute, totals


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return lines


def exposition(client: redis.Redis, counts: dict[JobStatus, int], queues, workers) -> str:
    """Every lorafleet metric, as one text body."""
    counters = totals(client)
    phases = counters["phases"]
    lines: list[str] = []
    lines += _metric(
        "lorafleet_queue_depth",
        "gauge",
        "Jobs waiting in each base model's queue.",
        [({"model": q.model}, q.depth) for q in queues],
    )
    lines += _metric(
        "lorafleet_jobs",
        "gauge",
        "Job records in Redis by status.",
        [({"status": s.value}, n) for s, n in counts.items()],
    )
    lines += _metric(
        "lorafleet_jobs_finished_total",
        "counter",
        "Jobs that ended, by final status.",
        [({"status": s}, counters["finished"].get(s, 0)) for s in ("succeeded", "failed", "cancelled")],
    )
    lines += _metric("lorafleet_phase_seconds", "summary", "Seconds jobs spent in each phase.", [])
    for phase in PHASES:
        lines.append(f'lorafleet_phase_seconds_sum{{phase="{phase}"}} {phases.get(f"{phase}:sum", 0):g}')
        lines.append(f'lorafleet_phase_seconds_count{{phase="{phase}"}} {phases.get(f"{phase}:count", 0):g}')
    lines += _metric(
        "lorafleet_lora_cache_hits_total",
        "counter",
        "LoRAs taken from a worker's cache.",
        [({}, counters["lora"].get("hits", 0))],
    )
    lines += _metric(
        "lorafleet_lora_cache_misses_total",
        "counter",
        "LoRAs a worker had to load and parse.",
        [({}, counters["lora"].get("misses", 0))],
    )
    lines += _metric(
        "lorafleet_workers",
        "gauge",
        "Workers by liveness (alive, stale, gone).",
        [({"liveness": l}, sum(w.liveness == l for w in workers)) for l in ("alive", "stale", "gone")],
    )
    lines += _metric(
        "lorafleet_images_last_hour",
        "gauge",
        "Images stored in the last 60 minutes.",
        [({}, sum(n for _, n in images_per_minute(client)))],
    )
    return "\n".join(lines) + "\n"
