"""The fleet: /v1/workers, /v1/queues, /v1/summary, /metrics and /healthz."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from lorafleet.common import __version__
from lorafleet.common.fleet.metrics import images_per_minute
from lorafleet.common.fleet.workers import QueueView, WorkerView, queue_views
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer.api.state import ApiState, State, Tenant
from lorafleet.producer.api.views import Summary
from lorafleet.producer.prometheus import CONTENT_TYPE, exposition

router = APIRouter()


def _queues(state: ApiState, workers: list[WorkerView]) -> list[QueueView]:
    # registered and local models (queue_views adds the ones live workers serve): a bounded
    # list, not every name ever submitted
    return queue_views(state.client.redis, set(state.models.names()), workers)


@router.get("/v1/workers", response_model=list[WorkerView])
def workers(state: State):
    """Every worker seen in the last hour, with its liveness (alive, stale, gone)."""
    return state.workers.all()


@router.get("/v1/queues", response_model=list[QueueView])
def queues(state: State):
    """Per base model: jobs waiting (by priority) and the workers serving it."""
    return _queues(state, state.workers.all())


@router.get("/v1/summary", response_model=Summary)
def summary(state: State, tenant: Tenant):
    """Counts by status (a tenant's own jobs, for a tenant), queues, workers and images per
    minute over the last hour."""
    fleet = state.workers.all()
    series = images_per_minute(state.client.redis)
    jobs = state.client.jobs
    counts = (
        jobs.count_by_status() if tenant is None else {s: jobs.count_of_tenant(tenant, s) for s in JobStatus}
    )
    return Summary(
        counts={s.value: n for s, n in counts.items()},
        queues=_queues(state, fleet),
        workers=fleet,
        throughput=[{"minute": m, "images": n} for m, n in series],
        images_last_hour=sum(n for _, n in series),
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(state: State):
    """Prometheus metrics: queue depth per model, jobs by status, phase durations, cache, workers."""

    def snapshot():
        fleet = state.workers.all()
        return state.client.jobs.count_by_status(), _queues(state, fleet), fleet

    return Response(exposition(state.client.redis, snapshot), media_type=CONTENT_TYPE)


@router.get("/healthz")
def healthz(state: State) -> dict[str, Any]:
    state.client.redis.ping()
    return {"ok": True, "version": __version__}
