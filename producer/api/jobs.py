"""/v1/jobs: queue, list, read, cancel and retry jobs, and fetch their images."""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse

from lorafleet.common.fleet.positions import standing
from lorafleet.common.infra.storage import LocalStorage
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import ID_PATTERN, JobRecord, JobStatus
from lorafleet.common.services.webhooks import read_event
from lorafleet.producer.api.state import ApiState, State, Tenant, visible
from lorafleet.producer.api.views import JobPage, JobView, Submission, job_view, problems, submission

MAX_PAGE = 500
"""Largest page of jobs one request may ask for."""
MAX_OFFSET = 10**9
"""Largest offset (Redis ranges are signed 64-bit; no fleet keeps this many records)."""

router = APIRouter()

_JOB_SCHEMA = {"$ref": "#/components/schemas/GenerationJob"}
_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_JOB_SCHEMA, {"type": "array", "items": _JOB_SCHEMA}]}}
        },
    }
}


def _record_or_404(state: ApiState, job_id: str, tenant: str | None) -> JobRecord:
    """The record, if the caller may see it; another tenant's job is as absent as a missing one."""
    record = state.client.jobs.get(job_id)
    if record is None or not visible(record.tenant, tenant):
        raise HTTPException(
            404, f"no job {job_id!r} (records are kept {state.settings.record_retention} s after they end)"
        )
    return record


@router.post(
    "/v1/jobs",
    status_code=201,
    response_model=Submission,
    openapi_extra=_SUBMIT_BODY,
    responses={
        200: {"description": "the same Idempotency-Key and body again: the jobs the first request queued"},
        409: {
            "description": "the Idempotency-Key was used with another body, or its first request is in progress"
        },
        422: {"description": "a field was refused; each problem names its field"},
    },
)
async def submit(
    request: Request,
    response: Response,
    state: State,
    tenant: Tenant,
    idempotency_key: str | None = Header(
        None, description="Retry-safe submits: the same key and body return the first request's jobs"
    ),
    batch_id: str | None = Query(None, pattern=ID_PATTERN.pattern),
    require_worker: bool = Query(False, description="refuse the jobs when no live worker serves their model"),
    batch_webhook_url: str | None = Query(
        None, max_length=2000, description="POSTed one signed event when every job of the batch has ended"
    ),
):
    """Queue one job, or a list of jobs as one batch (all of them, or none)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return problems(JobRejected(f"the body is not JSON ({exc})", field="body"))
    jobs = body if isinstance(body, list) else [body]
    if not jobs:
        return problems(JobRejected("an empty list", field="body", allowed="a job or a list of jobs"))
    # The client talks to Redis synchronously: keep it off the event loop.
    handles = await run_in_threadpool(
        state.client.submit_many,
        jobs,
        batch_id=batch_id,
        require_worker=require_worker,
        tenant=tenant,
        idempotency_key=idempotency_key,
        batch_webhook_url=batch_webhook_url,
    )
    return submission(handles, response)


@router.get("/v1/jobs", response_model=JobPage)
def list_jobs(
    state: State,
    tenant: Tenant,
    status: JobStatus | None = None,
    batch: str | None = None,
    model: str | None = None,
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    limit: int = Query(50, ge=1, le=MAX_PAGE),
):
    """Jobs, newest first, matching every filter given."""
    records, total = state.client.jobs.page(
        status=status, batch=batch, model=model, tenant=tenant, offset=offset, limit=limit
    )
    return JobPage(jobs=[job_view(r) for r in records], total=total, offset=offset, limit=limit)


@router.get("/v1/jobs/{job_id}", response_model=JobView, responses={404: {"description": "no such job"}})
def get_job(state: State, tenant: Tenant, job_id: str):
    """The record; a queued job also shows its position in its queue and an estimated start."""
    record = _record_or_404(state, job_id, tenant)
    return job_view(record, standing(state.client.redis, record) if not record.damaged else None)


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobView,
    responses={404: {"description": "no such job"}, 409: {"description": "the record is damaged"}},
)
def cancel_job(state: State, tenant: Tenant, job_id: str):
    """Cancel: a queued job never runs; a running one stops at its next step."""
    if _record_or_404(state, job_id, tenant).damaged:
        raise HTTPException(409, f"job {job_id}'s record is damaged; nothing can change it")
    return job_view(state.client.cancel(job_id))


@router.post(
    "/v1/jobs/{job_id}/retry",
    status_code=201,
    response_model=JobView,
    responses={404: {"description": "no such job"}, 409: {"description": "the job has not failed"}},
)
def retry_job(state: State, tenant: Tenant, job_id: str):
    """Queue a failed or cancelled job again, as a new job in the same batch."""
    record = _record_or_404(state, job_id, tenant)
    if record.status not in (JobStatus.failed, JobStatus.cancelled):
        raise HTTPException(
            409, f"job {job_id} is {record.status.value}; only failed or cancelled jobs are retried"
        )
    return job_view(state.client.get(state.client.retry(job_id).job_id))


@router.get("/v1/jobs/{job_id}/webhook", responses={404: {"description": "no such job, or no webhook"}})
def webhook(state: State, tenant: Tenant, job_id: str) -> dict:
    """The job's webhook event: its state (pending, delivered, given up) and every attempt."""
    record = _record_or_404(state, job_id, tenant)
    event = read_event(state.client.redis, job_id)
    if event is None:
        detail = "names no webhook_url" if not record.job.webhook_url else "has not ended: no event yet"
        raise HTTPException(404, f"job {job_id} {detail}")
    return {k: event[k] for k in ("id", "url", "state", "attempts", "created")}


@router.get(
    "/v1/jobs/{job_id}/images/{index}",
    response_class=FileResponse,
    responses={404: {"description": "no such image"}, 307: {"description": "a presigned S3 URL"}},
)
def image(state: State, tenant: Tenant, job_id: str, index: int):
    """The PNG: served from a local store, or a redirect to a presigned S3 URL."""
    record = _record_or_404(state, job_id, tenant)
    if not 0 <= index < len(record.images):
        raise HTTPException(404, f"job {job_id} has {len(record.images)} images")
    return stored_png(state, record.images[index].key)


def stored_png(state: ApiState, key: str):
    """A stored PNG: the file from a local store, or a redirect to a presigned S3 URL."""
    storage = state.storage
    if isinstance(storage, LocalStorage):
        path = storage.root / key
        if not path.is_file():
            raise HTTPException(404, f"{key} is no longer in {storage.root}")
        return FileResponse(path, media_type="image/png")
    return RedirectResponse(storage.presigned_url(key), status_code=307)
