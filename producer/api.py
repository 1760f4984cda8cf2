"""The HTTP API (FastAPI): the same jobs, errors and records as the SDK, over JSON.

    POST   /v1/jobs                    one job or a list (one batch); 422 names each bad field
    GET    /v1/jobs                    filters status, batch, model; paging offset, limit
    GET    /v1/jobs/{id}               the record, its image URLs, a CLI line that resubmits it
    DELETE /v1/jobs/{id}               cancel
    POST   /v1/jobs/{id}/retry         a failed or cancelled job, as a new job
    GET    /v1/jobs/{id}/images/{i}    the PNG (a local file through the app, S3 by redirect)
    GET    /v1/batches/{id}            counts by status, the jobs, the image URLs
    GET    /v1/workers, /v1/queues     heartbeats; per-model queue depth and who serves it
    GET    /v1/summary                 what the dashboard's overview shows, in one call
    GET    /metrics                    Prometheus text format
    GET    /healthz                    Redis reachable (no token needed)

The dashboard's pages (pages.py) read the same endpoints.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, create_model

from lorafleet.common import __version__
from lorafleet.common.errors import ConfigError, InvalidInput, JobRejected, TransientError
from lorafleet.common.jobs import ID_PATTERN, JobRecord, JobStatus
from lorafleet.common.metrics import images_per_minute
from lorafleet.common.models import ModelRegistry
from lorafleet.common.settings import Settings
from lorafleet.common.storage import LocalStorage, open_storage
from lorafleet.common.workers import QueueView, WorkerRegistry, WorkerView, queue_views
from lorafleet.producer.auth import TokenMiddleware, parse_tokens
from lorafleet.producer.client import Client
from lorafleet.producer.display import resubmit_command
from lorafleet.producer.prometheus import CONTENT_TYPE, exposition

logger = logging.getLogger(__name__)

MAX_PAGE = 500
"""Largest page of jobs one request may ask for."""
MAX_OFFSET = 10**9
"""Largest offset (Redis ranges are signed 64-bit; no fleet keeps this many records)."""


# A record as the API shows it: its id first, the record's own fields, then the image
# URLs and a CLI line that resubmits it. Built field by field rather than by subclassing,
# because JobRecord already has a ``job_id`` property that a field must not shadow.
JobView = create_model(
    "JobView",
    __doc__="A job record with its id, image URLs and a resubmitting CLI line.",
    job_id=(str, ...),
    **{name: (field.annotation, field) for name, field in JobRecord.model_fields.items()},
    image_urls=(list[str], ...),
    cli=(str, ...),
)


class JobPage(BaseModel):
    jobs: list[JobView]
    total: int
    offset: int
    limit: int


class Submitted(BaseModel):
    job_id: str
    batch_id: str
    queue: str
    warnings: list[str]


class Submission(BaseModel):
    batch_id: str
    jobs: list[Submitted]


class BatchView(BaseModel):
    batch_id: str
    counts: dict[str, int]
    jobs: list[JobView]
    images: list[str]


class Summary(BaseModel):
    counts: dict[str, int]
    queues: list[QueueView]
    workers: list[WorkerView]
    throughput: list[dict[str, int]]
    images_last_hour: int


def job_view(record: JobRecord) -> JobView:
    urls = [f"/v1/jobs/{record.job_id}/images/{i}" for i in range(len(record.images))]
    return JobView(
        **record.model_dump(), job_id=record.job_id, image_urls=urls, cli=resubmit_command(record.job)
    )


def _problems(exc: InvalidInput) -> JSONResponse:
    return JSONResponse({"detail": [{"field": f, "message": m} for f, m in exc.problems]}, status_code=422)


_JOB_SCHEMA = {"$ref": "#/components/schemas/GenerationJob"}
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_JOB_SCHEMA, {"type": "array", "items": _JOB_SCHEMA}]}}
        },
    }
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API and dashboard for the fleet that ``settings`` points at."""
    settings = settings or Settings()
    client = Client(settings)
    registry = WorkerRegistry(client.redis)
    storage = open_storage(settings)
    models = ModelRegistry(settings, client.redis)
    app = FastAPI(
        title="lorafleet",
        version=__version__,
        description="A distributed job queue for batch image generation with LoRA stacks.",
        separate_input_output_schemas=False,
    )
    tokens = parse_tokens(settings.api_tokens)
    if tokens:
        app.add_middleware(TokenMiddleware, tokens=tokens)
    app.state.client = client
    app.state.settings = settings

    @app.exception_handler(InvalidInput)
    async def rejected(request: Request, exc: InvalidInput) -> JSONResponse:
        return _problems(exc)

    @app.exception_handler(TransientError)
    @app.exception_handler(ConfigError)
    @app.exception_handler(redis.ConnectionError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=503)

    def record_or_404(job_id: str) -> JobRecord:
        record = client.jobs.get(job_id)
        if record is None:
            raise HTTPException(
                404, f"no job {job_id!r} (records are kept {settings.record_retention} s after they end)"
            )
        return record

    # ------------------------------------------------------------------ jobs
    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=Submission,
        openapi_extra=_SUBMIT_BODY,
        responses={422: {"description": "a field was refused; each problem names its field"}},
    )
    async def submit(
        request: Request,
        batch_id: str | None = Query(None, pattern=ID_PATTERN.pattern),
        require_worker: bool = Query(
            False, description="refuse the jobs when no live worker serves their model"
        ),
    ):
        """Queue one job, or a list of jobs as one batch (all of them, or none)."""
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return _problems(JobRejected(f"the body is not JSON ({exc})", field="body"))
        jobs = body if isinstance(body, list) else [body]
        if not jobs:
            return _problems(JobRejected("an empty list", field="body", allowed="a job or a list of jobs"))
        # The client talks to Redis synchronously: keep it off the event loop.
        handles = await run_in_threadpool(
            client.submit_many, jobs, batch_id=batch_id, require_worker=require_worker
        )
        return Submission(
            batch_id=handles[0].batch_id,
            jobs=[
                Submitted(job_id=h.job_id, batch_id=h.batch_id, queue=h.queue, warnings=h.warnings)
                for h in handles
            ],
        )

    @app.get("/v1/jobs", response_model=JobPage)
    def list_jobs(
        status: JobStatus | None = None,
        batch: str | None = None,
        model: str | None = None,
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        limit: int = Query(50, ge=1, le=MAX_PAGE),
    ):
        """Jobs, newest first, matching every filter given."""
        records, total = client.jobs.page(status=status, batch=batch, model=model, offset=offset, limit=limit)
        return JobPage(jobs=[job_view(r) for r in records], total=total, offset=offset, limit=limit)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"description": "no such job"}})
    def get_job(job_id: str):
        return job_view(record_or_404(job_id))

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"description": "no such job"}})
    def cancel_job(job_id: str):
        """Cancel: a queued job never runs; a running one stops at its next step."""
        record_or_404(job_id)
        return job_view(client.cancel(job_id))

    @app.post(
        "/v1/jobs/{job_id}/retry",
        status_code=201,
        response_model=JobView,
        responses={404: {"description": "no such job"}, 409: {"description": "the job has not failed"}},
    )
    def retry_job(job_id: str):
        """Queue a failed or cancelled job again, as a new job in the same batch."""
        record = record_or_404(job_id)
        if record.status not in (JobStatus.failed, JobStatus.cancelled):
            raise HTTPException(
                409, f"job {job_id} is {record.status.value}; only failed or cancelled jobs are retried"
            )
        return job_view(client.get(client.retry(job_id).job_id))

    @app.get(
        "/v1/jobs/{job_id}/images/{index}",
        response_class=FileResponse,
        responses={404: {"description": "no such image"}, 307: {"description": "a presigned S3 URL"}},
    )
    def image(job_id: str, index: int):
        """The PNG: served from a local store, or a redirect to a presigned S3 URL."""
        record = record_or_404(job_id)
        if not 0 <= index < len(record.images):
            raise HTTPException(404, f"job {job_id} has {len(record.images)} images")
        key = record.images[index].key
        if isinstance(storage, LocalStorage):
            path = storage.root / key
            if not path.is_file():
                raise HTTPException(404, f"image {key} is no longer in {storage.root}")
            return FileResponse(path, media_type="image/png")
        return RedirectResponse(storage.presigned_url(key), status_code=307)

    @app.get(
        "/v1/batches/{batch_id}", response_model=BatchView, responses={404: {"description": "no such batch"}}
    )
    def batch(batch_id: str):
        records = client.batch(batch_id)
        if not records:
            raise HTTPException(404, f"no batch {batch_id!r}")
        counts = {s.value: 0 for s in JobStatus}
        for record in records:
            counts[record.status.value] += 1
        views = [job_view(r) for r in records]
        return BatchView(
            batch_id=batch_id, counts=counts, jobs=views, images=[u for v in views for u in v.image_urls]
        )

    # ------------------------------------------------------------------ fleet
    def fleet_queues(workers: list[WorkerView]) -> list[QueueView]:
        return queue_views(client.redis, set(models.names()) | set(client.jobs.models()), workers)

    @app.get("/v1/workers", response_model=list[WorkerView])
    def workers():
        """Every worker seen in the last hour, with its liveness (alive, stale, gone)."""
        return registry.all()

    @app.get("/v1/queues", response_model=list[QueueView])
    def queues():
        """Per base model: jobs waiting (by priority) and the workers serving it."""
        return fleet_queues(registry.all())

    @app.get("/v1/summary", response_model=Summary)
    def summary():
        """Counts by status, queues, workers and images per minute over the last hour."""
        fleet = registry.all()
        series = images_per_minute(client.redis)
        return Summary(
            counts={s.value: n for s, n in client.jobs.count_by_status().items()},
            queues=fleet_queues(fleet),
            workers=fleet,
            throughput=[{"minute": m, "images": n} for m, n in series],
            images_last_hour=sum(n for _, n in series),
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        """Prometheus metrics: queue depth per model, jobs by status, phase durations, cache, workers."""

        def snapshot():
            fleet = registry.all()
            return client.jobs.count_by_status(), fleet_queues(fleet), fleet

        return Response(exposition(client.redis, snapshot), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        client.redis.ping()
        return {"ok": True, "version": __version__}

    from lorafleet.producer.pages import mount_dashboard

    mount_dashboard(app, tokens)
    return app
