"""/metrics in the Prometheus text exposition format, through prometheus_client.

Every value is read from Redis when Prometheus scrapes (the fleet's counters are shared by
all workers), so the metrics are a custom collector rather than process-local counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from lorafleet.common.fleet.metrics import images_per_minute, totals
from lorafleet.common.fleet.workers import QueueView, WorkerView
from lorafleet.common.schema.jobs import PHASES, JobStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the text exposition format."""

Snapshot = Callable[[], tuple[dict[JobStatus, int], list[QueueView], list[WorkerView]]]


class FleetCollector(Collector):
    """Collects lorafleet's metrics from Redis at each scrape."""

    def __init__(self, client: redis.Redis, snapshot: Snapshot) -> None:
        self.redis = client
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        counts, queues, workers = self.snapshot()
        counters = totals(self.redis)
        depth = GaugeMetricFamily(
            "lorafleet_queue_depth", "Jobs waiting in each base model's queue.", labels=["model"]
        )
        for queue in queues:
            depth.add_metric([queue.model], queue.depth)
        yield depth
        jobs = GaugeMetricFamily("lorafleet_jobs", "Job records in Redis by status.", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status.value], count)
        yield jobs
        finished = CounterMetricFamily(
            "lorafleet_jobs_finished", "Jobs that ended, by final status.", labels=["status"]
        )
        for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
            finished.add_metric([status.value], counters["finished"].get(status.value, 0))
        yield finished
        phases = SummaryMetricFamily(
            "lorafleet_phase_seconds", "Seconds jobs spent in each phase.", labels=["phase"]
        )
        for phase in PHASES:
            sums = counters["phases"]
            phases.add_metric([phase], sums.get(f"{phase}:count", 0), sums.get(f"{phase}:sum", 0))
        yield phases
        yield CounterMetricFamily(
            "lorafleet_lora_cache_hits",
            "LoRAs taken from a worker's cache.",
            value=counters["lora"].get("hits", 0),
        )
        yield CounterMetricFamily(
            "lorafleet_lora_cache_misses",
            "LoRAs a worker had to load and parse.",
            value=counters["lora"].get("misses", 0),
        )
        liveness = GaugeMetricFamily(
            "lorafleet_workers", "Workers by liveness (alive, stale, gone).", labels=["liveness"]
        )
        for state in ("alive", "stale", "gone"):
            liveness.add_metric([state], sum(w.liveness == state for w in workers))
        yield liveness
        yield GaugeMetricFamily(
            "lorafleet_images_last_hour",
            "Images stored in the last 60 minutes.",
            value=sum(n for _, n in images_per_minute(self.redis)),
        )


def exposition(client: redis.Redis, snapshot: Snapshot) -> bytes:
    """Every lorafleet metric, as one text body."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(client, snapshot))
    return generate_latest(registry)
