"""/v1/batches/{id} (a batch's counts, jobs, image URLs, and a sweep's layout and grids) and
/v1/sweeps (a base job and axes, expanded into one batch)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import ID_PATTERN, JobStatus
from lorafleet.common.services.sweeps import SweepSpec, read_layout
from lorafleet.producer.api.jobs import stored_png
from lorafleet.producer.api.state import State, Tenant, visible
from lorafleet.producer.api.views import BatchView, Submission, job_view, problems, submission

router = APIRouter()


@router.get(
    "/v1/batches/{batch_id}", response_model=BatchView, responses={404: {"description": "no such batch"}}
)
def batch(state: State, tenant: Tenant, batch_id: str):
    records = [r for r in state.client.batch(batch_id) if visible(r.tenant, tenant)]
    if not records:
        raise HTTPException(404, f"no batch {batch_id!r}")
    counts = {s.value: 0 for s in JobStatus}
    for record in records:
        counts[record.status.value] += 1
    views = [job_view(r) for r in records]
    sweep = read_layout(state.client.redis, batch_id)
    grids = [f"/v1/batches/{batch_id}/grids/{z}" for z in range(len(sweep["grids"]))] if sweep else []
    return BatchView(
        batch_id=batch_id,
        counts=counts,
        jobs=views,
        images=[u for v in views for u in v.image_urls],
        sweep=sweep["axes"] if sweep else None,
        grids=grids,
    )


@router.get(
    "/v1/batches/{batch_id}/grids/{page}",
    response_class=FileResponse,
    responses={404: {"description": "no such grid"}, 307: {"description": "a presigned S3 URL"}},
)
def grid(state: State, tenant: Tenant, batch_id: str, page: int):
    """A sweep's grid page (one per Z value), once its last job has ended."""
    records = state.client.batch(batch_id)
    sweep = read_layout(state.client.redis, batch_id)
    if not records or not visible(records[0].tenant, tenant) or sweep is None:
        raise HTTPException(404, f"no sweep {batch_id!r}")
    if not 0 <= page < len(sweep["grids"]):
        raise HTTPException(
            404, f"sweep {batch_id} has {len(sweep['grids'])} grid pages (drawn when it ends)"
        )
    return stored_png(state, sweep["grids"][page])


@router.post(
    "/v1/sweeps",
    status_code=201,
    response_model=Submission,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SweepSpec"}}},
        }
    },
    responses={
        200: {"description": "the same Idempotency-Key and body again: the jobs the first request queued"},
        409: {"description": "the Idempotency-Key was used with another body"},
        422: {"description": "a field or axis was refused, or the sweep makes too many jobs"},
    },
)
async def sweep(
    request: Request,
    response: Response,
    state: State,
    tenant: Tenant,
    batch_id: str | None = Query(None, pattern=ID_PATTERN.pattern),
    require_worker: bool = Query(False),
    batch_webhook_url: str | None = Query(None, max_length=2000),
    idempotency_key: str | None = Header(None),
):
    """A base job and up to three axes, expanded into one batch (all of it, or nothing); its
    grid is drawn when the batch ends (GET /v1/batches/{id} lists it)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        return problems(JobRejected(f"the body is not JSON ({exc})", field="body"))
    if not isinstance(body, dict):
        return problems(JobRejected("the body is not a sweep", field="body", allowed="{base, x, y?, z?}"))
    handles = await run_in_threadpool(
        state.client.sweep,
        body,
        batch_id=batch_id,
        require_worker=require_worker,
        tenant=tenant,
        idempotency_key=idempotency_key,
        batch_webhook_url=batch_webhook_url,
    )
    return submission(handles, response)


def add_sweep_schema(app) -> None:
    """Put SweepSpec (and Axis) in the app's OpenAPI components, which /v1/sweeps refers to
    (its body is read by hand, so that refusals name fields as every other route does)."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            spec = SweepSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(spec.pop("$defs", {}))
            components["SweepSpec"] = spec
        return app.openapi_schema

    app.openapi = openapi
