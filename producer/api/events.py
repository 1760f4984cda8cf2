"""/v1/events: job changes as server-sent events (sse-starlette), from the Redis event stream.

The first event is ``event: ready`` with the position the stream starts after; each one
after it is ``event: job``, ``id:`` the stream entry's id and ``data:`` JSON {job_id,
batch_id, status, step, total}. Filters: ``batch`` and ``job`` (repeatable). A client that
reconnects with ``Last-Event-ID`` (browsers' EventSource does it by itself) reads on from
there, so nothing in between is lost while the stream keeps it (common/fleet/events.py). A tenant
sees its own jobs' events only.

An open stream holds no thread: it waits for entries on its own asyncio Redis connection, so
any number of streams leave the threadpool to the API's other routes.
"""

from __future__ import annotations

import json

import anyio
import redis.asyncio
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from lorafleet.common.fleet.events import BLOCK_SECONDS, READ_COUNT, JobEvent, parse, tail
from lorafleet.common.schema import keys
from lorafleet.producer.api.state import State, Tenant, visible

router = APIRouter()

PING_SECONDS = 15
"""A comment line this often keeps proxies from closing a quiet stream."""


async def _read_events(client: redis.asyncio.Redis, after: str) -> list[JobEvent]:
    """common/fleet/events.read_events on an asyncio client: the entries after ``after``,
    waiting up to BLOCK_SECONDS for the first one in the event loop rather than in a thread."""
    return parse(await client.xread({keys.EVENTS: after}, block=int(BLOCK_SECONDS * 1000), count=READ_COUNT))


@router.get("/v1/events", response_class=EventSourceResponse)
async def events(
    request: Request,
    state: State,
    tenant: Tenant,
    batch: str | None = None,
    job: list[str] = Query(default=[]),  # noqa: B008
    last_event_id: str | None = Header(
        None, pattern=r"^\d{1,20}-\d{1,20}$", description="Read on after this event id (a reconnect)"
    ),
):
    """Job events as they happen, for every job or for one batch or some jobs."""
    cursor = last_event_id or await run_in_threadpool(tail, state.client.redis)
    wanted = set(job)

    async def stream():
        nonlocal cursor
        reader = state.client.broker.async_client()
        try:
            # first, where the stream starts: a client that drops before any job event resumes here
            yield {"event": "ready", "id": cursor, "data": json.dumps({"after": cursor})}
            while not await request.is_disconnected():
                for event in await _read_events(reader, cursor):
                    cursor = event.id
                    if batch is not None and event.batch_id != batch:
                        continue
                    if wanted and event.job_id not in wanted:
                        continue
                    if not visible(event.tenant, tenant):
                        continue
                    yield {"event": "job", "id": event.id, "data": json.dumps(event.data())}
        finally:
            with anyio.CancelScope(shield=True):  # a client that left cancels the stream
                await reader.aclose()

    return EventSourceResponse(stream(), ping=PING_SECONDS)
