"""Job events: every change of a job record, in order, from a Redis stream (``keys.EVENTS``).

``JobStore`` adds one entry per record it creates and ``fleet.lifecycle`` one per change, in
the same atomic step (queued, running, each progress write, the end), so readers learn of changes instead of polling: the HTTP API streams them as
server-sent events (``GET /v1/events``, resumable with ``Last-Event-ID``: an entry's id is the
stream's), ``Client.watch`` yields them to scripts, and ``Client.wait`` wakes on them. The
stream keeps about ``keys.EVENTS_KEPT`` entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import redis

from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobRecord

BLOCK_SECONDS = 2.0
"""Longest a read waits for new entries (well under the clients' socket timeout)."""


@dataclass(frozen=True)
class JobEvent:
    """One change of a job's record."""

    id: str
    """The stream entry's id: give it back (Last-Event-ID, ``after=``) to read on after it."""
    job_id: str
    batch_id: str
    status: str
    step: int
    total: int
    tenant: str | None

    def data(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("id", "tenant")}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def tail(client: redis.Redis) -> str:
    """The id of the newest entry ("0-0" for an empty stream): read after it for what comes next."""
    last = client.xrevrange(keys.EVENTS, count=1)
    return _text(last[0][0]) if last else "0-0"


def fields(record: JobRecord) -> dict[str, str | int]:
    """The stream entry of a record as written: what a JobEvent reads back."""
    return {
        "job_id": record.job_id,
        "batch_id": record.job.batch_id or "",
        "status": record.status.value,
        "step": record.progress.step,
        "total": record.progress.total,
        "tenant": record.tenant or "",
    }


def parse(replies) -> list[JobEvent]:
    """The JobEvents of an XREAD reply (redis-py's, blocking or asyncio)."""
    events = []
    for _, entries in replies or []:
        for entry_id, raw in entries:
            f = {_text(k): _text(v) for k, v in raw.items()}
            events.append(
                JobEvent(
                    id=_text(entry_id),
                    job_id=f["job_id"],
                    batch_id=f["batch_id"],
                    status=f["status"],
                    step=int(f["step"]),
                    total=int(f["total"]),
                    tenant=f["tenant"] or None,
                )
            )
    return events


READ_COUNT = 1000
"""The most entries one read takes."""


def read_events(
    client: redis.Redis, after: str, block: float = BLOCK_SECONDS, count: int = READ_COUNT
) -> list[JobEvent]:
    """The entries after ``after``, waiting up to ``block`` seconds for the first one."""
    return parse(client.xread({keys.EVENTS: after}, block=int(block * 1000), count=count))
