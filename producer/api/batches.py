"""/v1/batches/{id}: a batch's counts by status, its jobs and every image URL."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from lorafleet.common.jobs import JobStatus
from lorafleet.producer.api.state import State, Tenant, visible
from lorafleet.producer.api.views import BatchView, job_view

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
    return BatchView(
        batch_id=batch_id, counts=counts, jobs=views, images=[u for v in views for u in v.image_urls]
    )
