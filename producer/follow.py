"""Following, the half of the SDK's Client that reads: records, batches, waiting on them
(woken by the event stream, not polling), watching their events, and cancelling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence

import redis

from lorafleet.common.fleet.events import BLOCK_SECONDS, JobEvent, read_events, tail
from lorafleet.common.schema.errors import BadArgument, JobRejected
from lorafleet.common.schema.jobs import JobRecord, JobStatus

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
"""How often wait() reads the records while Redis is away (else the event stream wakes it)."""
RESYNC_SECONDS = 10.0
"""wait() reads the records of the jobs it has news of; every pending one at least this often."""


class Following:
    """Mixed into Client (producer/client.py): its following half."""

    # ------------------------------------------------------------------ follow
    def get(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None:
            raise JobRejected(
                f"no job {job_id!r}",
                field="job_id",
                allowed=f"the id of a job submitted in the last {self.settings.record_retention // 3600} h",
            )
        return record

    def batch(self, batch_id: str) -> list[JobRecord]:
        """The records of a batch, in submit order."""
        ids = self.jobs.batch(batch_id)
        return [r for r in self.jobs.get_many(ids) if r is not None]

    def wait(
        self,
        job_ids: Sequence[str],
        timeout: float | None = None,
        on_update: Callable[[list[JobRecord]], None] | None = None,
    ) -> list[JobRecord]:
        """Block until every job has ended (succeeded, failed or cancelled), reading on
        through a Redis outage or failover.

        ``on_update`` is called with the records after each read, for progress displays.
        Raises TimeoutError if ``timeout`` seconds pass first.
        """
        ids = list(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = self._tail()  # before the first read: no change between them is missed
        first = self._read(ids)
        while first is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Redis stayed unavailable for {timeout:g} s")
            time.sleep(POLL_SECONDS)
            first = self._read(ids)
        latest: dict[str, JobRecord] = {}
        for job_id, record in zip(ids, first):
            if record is None:
                self.get(job_id)  # raises, saying how long records are kept
            latest[job_id] = record  # type: ignore[assignment]
        changed: set[str] | None = set()  # what to read next: the jobs with events (None: all)
        resync = time.monotonic() + RESYNC_SECONDS
        told = False  # on_update has had the records once
        # Ended records do not change: only pending ones with news are read again, and every
        # pending one now and then (a stream trimmed or unreadable meanwhile). The pending
        # set shrinks as jobs end, so a wake costs the jobs with news, not the whole batch.
        pending = dict.fromkeys(i for i in ids if not latest[i].status.final)
        while True:
            if changed is None or time.monotonic() >= resync:
                reading, resync = list(pending), time.monotonic() + RESYNC_SECONDS
            else:
                reading = [i for i in changed if i in pending]
            found = self._read(reading) if reading else []
            if found is None:
                found, resync = [latest[i] for i in reading], 0.0  # Redis away: all, once back
            for job_id, record in zip(reading, found):
                if record is None:
                    raise JobRejected(f"job {job_id!r} disappeared (its record expired)", field="job_id")
                latest[job_id] = record
                if record.status.final:
                    pending.pop(job_id, None)
            if on_update and (reading or not told):
                on_update([latest[i] for i in ids])
                told = True
            if not pending:
                return [latest[i] for i in ids]
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(pending)} of {len(ids)} jobs still unfinished after {timeout:g} s")
            # with no progress display, only an end is news: a running job's record is not read
            cursor, changed = self._until_change(cursor, pending.keys(), ended_only=on_update is None)

    def _tail(self) -> str | None:
        try:
            return tail(self.redis)
        except redis.RedisError:
            return None

    def _until_change(
        self, cursor: str | None, pending: Collection[str], *, ended_only: bool = False
    ) -> tuple[str | None, set[str] | None]:
        """Wait for events of pending jobs (``ended_only``: their ends) for at most
        BLOCK_SECONDS: the new cursor, and the pending jobs the events were about (None:
        unknown, the stream could not be read)."""
        if cursor is None:
            time.sleep(POLL_SECONDS)
            return self._tail(), None
        changed: set[str] = set()
        try:
            deadline = time.monotonic() + BLOCK_SECONDS
            while time.monotonic() < deadline:
                events = read_events(self.redis, cursor, block=max(0.01, deadline - time.monotonic()))
                if events:
                    cursor = events[-1].id
                    changed |= {
                        e.job_id
                        for e in events
                        if e.job_id in pending and (not ended_only or JobStatus(e.status).final)
                    }
                    if changed:
                        break
        except redis.RedisError:
            time.sleep(POLL_SECONDS)
            return cursor, None
        return cursor, changed

    def watch(
        self,
        *,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
        after: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[JobEvent]:
        """The events of a batch's jobs or of ``job_ids`` as they happen (queued, running,
        progress, the end), until every one of them has ended; from ``after`` (an event id) on,
        else from now. Raises TimeoutError if ``timeout`` seconds pass first."""
        if (batch_id is None) == (job_ids is None):
            raise BadArgument("watch a batch or jobs", field="batch_id", allowed="batch_id= or job_ids=")
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = after or tail(self.redis)
        watched = list(job_ids) if job_ids is not None else self.jobs.batch(batch_id or "")
        open_ = {r.job_id for r in self.jobs.get_many(watched) if r is not None and not r.status.final}
        while open_:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(open_)} watched jobs still unfinished after {timeout:g} s")
            for event in read_events(self.redis, cursor):
                cursor = event.id
                if event.job_id in open_ or (batch_id is not None and event.batch_id == batch_id):
                    yield event
                    if event.status in ("succeeded", "failed", "cancelled"):
                        open_.discard(event.job_id)

    def _read(self, ids: list[str]) -> list[JobRecord | None] | None:
        """The records, or None while Redis is away or failing over (waits read on)."""
        try:
            return self.jobs.get_many(ids)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("waiting: Redis unavailable (%s); reading again", exc)
            return None

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one never runs; a running one stops at its next step."""
        if self.get(job_id).damaged:
            raise JobRejected(f"job {job_id}'s record is damaged; nothing can change it", field="job_id")

        record = self.lifecycle.cancel(job_id)  # a queued job's end: its webhook and counts now
        assert record is not None
        logger.info("cancel of job %s: now %s", job_id, record.status.value)
        return record
