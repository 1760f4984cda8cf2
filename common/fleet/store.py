"""Job records in Redis: the one source of job state.

The record of a job is ``keys.job(id)``; indexes by submit time list every job, and the jobs
of each status, batch and model (``keys`` lists the schema). The producer creates a record
(queued) here; every later change goes through ``fleet.lifecycle`` (one atomic step per
transition, with its effects). Index entries of expired records are dropped when a listing
meets them, and by upkeep.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

import redis
from pydantic import ValidationError

from lorafleet.common.fleet import events
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobRecord, JobStatus, describe_validation_error, utcnow

logger = logging.getLogger(__name__)


BATCH_INDEX_SLACK = 24 * 3600
"""Seconds a batch's index is kept beyond twice the record retention, from its last submit."""


def score(record: JobRecord) -> float:
    return record.submitted_at.timestamp()


def stored_form(record: JobRecord) -> str:
    """The record as stored, checked to read back: a record the readers could not parse is
    never written (JobRejected names the field)."""
    return read_back(record)[0]


def read_back(record: JobRecord) -> tuple[str, JobRecord]:
    """The record as stored and as a reader parses it (``stored_form``'s check gives both)."""
    text = record.model_dump_json()
    try:
        return text, JobRecord.model_validate_json(text)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        raise JobRejected(
            "; ".join(f"{field}: {message}" for field, message in problems), field=problems[0][0]
        ) from None


def parsed(job_id: str, raw: bytes | None) -> JobRecord | None:
    """The stored record, or a damaged one's stand-in (``JobRecord.damaged_record``)."""
    if raw is None:
        return None
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        logger.error("job %s: stored record is damaged (%s: %s)", job_id, where, first["msg"])
        return JobRecord.damaged_record(job_id, raw, f"{where}: {first['msg']}")


class JobStore:
    """Reads and changes job records; safe to share between threads of one process."""

    def __init__(self, client: redis.Redis, *, retention: int) -> None:
        self.redis = client
        self.retention = retention

    # ------------------------------------------------------------------ create
    def create_many(self, records: Iterable[JobRecord]) -> dict[str, str]:
        """Write new records (status queued) and index them; refuses an id already taken.
        Returns each record as stored, by job id (its message carries it: ``send_job``)."""
        records = list(records)
        stored = {r.job_id: stored_form(r) for r in records}
        record_keys = [keys.job(r.job_id) for r in records]
        if len(set(record_keys)) != len(record_keys):
            raise JobRejected("the same job_id appears twice in one submission", field="job_id")
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*record_keys)
                    # One round trip for the usual case (fresh ids); per key only if one is taken.
                    taken = (
                        [r.job_id for r, n in zip(records, self._exist(pipe, record_keys)) if n]
                        if pipe.exists(*record_keys)
                        else []
                    )
                    if taken:
                        raise JobRejected(
                            f"job_id {taken[0]!r} is already taken",
                            field="job_id",
                            allowed="a new id, or none (the producer makes one)",
                        )
                    pipe.multi()
                    self._index_new(pipe, records, stored)
                    pipe.execute()
                    return stored
                except redis.WatchError:
                    continue

    def _index_new(self, pipe, records: list[JobRecord], stored: dict[str, str]) -> None:
        """Queue the commands that write and index new records: one command per index for the
        whole submission (a sweep of a thousand jobs is a few dozen commands, not thousands),
        and per record only its SET and its event."""
        by_index: dict[str, dict[str, float]] = {}
        batch_counts: dict[str, int] = {}
        sets: dict[str, set[str]] = {}
        for record in records:
            at = score(record)
            pipe.set(keys.job(record.job_id), stored[record.job_id])
            self._announce(pipe, record)
            names = [
                keys.ALL_JOBS,
                keys.status(record.status.value),
                keys.model_jobs(record.job.model),
                keys.UNSENT,
            ]
            sets.setdefault(keys.MODELS_WITH_JOBS, set()).add(record.job.model)
            if record.job.batch_id:
                names.append(keys.batch(record.job.batch_id))
                batch_counts[record.job.batch_id] = batch_counts.get(record.job.batch_id, 0) + 1
            if record.tenant is not None:
                names.append(keys.tenant_jobs(record.tenant))
                sets.setdefault(keys.TENANTS_WITH_JOBS, set()).add(record.tenant)
            for name in names:
                by_index.setdefault(name, {})[record.job_id] = at
        for name, members in by_index.items():
            pipe.zadd(name, members)
        for name, members in sets.items():
            pipe.sadd(name, *members)
        for batch_id, count in batch_counts.items():
            pipe.hincrby(keys.batch_end(batch_id), "total", count)
            # a batch's index and end tracker (fleet/lifecycle.py counts the ends) outlive its
            # records' retention (they expire one by one); set once they exist: EXPIRE of a
            # key not yet there does nothing
            for name in (keys.batch(batch_id), keys.batch_end(batch_id)):
                pipe.expire(name, 2 * self.retention + BATCH_INDEX_SLACK)

    @staticmethod
    def _announce(client, record: JobRecord) -> None:
        """Add the record's creation to the event stream (keys.EVENTS)."""
        client.xadd(keys.EVENTS, events.fields(record), maxlen=keys.EVENTS_KEPT, approximate=True)

    @staticmethod
    def _exist(pipe: redis.client.Pipeline, names: list[str]) -> list[bool]:
        # In WATCH mode a pipeline runs commands at once; one EXISTS per key tells which.
        return [bool(pipe.exists(key)) for key in names]

    def sent(self, job_ids: Iterable[str]) -> None:
        """Mark jobs whose messages are sent (``create_many`` lists them as unsent)."""
        ids = list(job_ids)
        if ids:
            self.redis.zrem(keys.UNSENT, *ids)

    def mark_unsent(self, job_ids: Iterable[str]) -> None:
        """List jobs whose message may be gone (a worker took it to sample them along, a
        hand-back's may be dropped, a Redis failure lost it): upkeep sends one to each that is
        still queued a while later (common/fleet/upkeep.py); a move out of queued unlists it."""
        now = utcnow().timestamp()
        ids = list(job_ids)
        if ids:
            self.redis.zadd(keys.UNSENT, {job_id: now for job_id in ids})

    def unsent(self, older_than: float) -> list[str]:
        """Ids of jobs written more than ``older_than`` seconds ago whose messages were never sent."""
        cutoff = utcnow().timestamp() - older_than
        return [i.decode() for i in self.redis.zrangebyscore(keys.UNSENT, "-inf", cutoff)]

    def trim_indexes(self, older_than: float, batch: int = 500) -> int:
        """Drop from every index the ids of records submitted more than ``older_than`` seconds
        ago that have expired; returns how many. (Listings drop the ones they meet too.)"""
        cutoff = utcnow().timestamp() - older_than
        ids = [
            i.decode() for i in self.redis.zrangebyscore(keys.ALL_JOBS, "-inf", cutoff, start=0, num=batch)
        ]
        if not ids:
            return 0
        exists = self.redis.pipeline(transaction=False)
        for job_id in ids:
            exists.exists(keys.job(job_id))
        gone = [job_id for job_id, present in zip(ids, exists.execute()) if not present]
        if gone:
            pipe = self.redis.pipeline(transaction=False)
            for key in [keys.ALL_JOBS, keys.UNSENT] + [keys.status(s.value) for s in JobStatus]:
                pipe.zrem(key, *gone)
            for model in self.models():
                pipe.zrem(keys.model_jobs(model), *gone)
            for tenant in self.redis.smembers(keys.TENANTS_WITH_JOBS):
                pipe.zrem(keys.tenant_jobs(tenant.decode()), *gone)
            pipe.execute()
        return len(gone)

    def delete(self, job_ids: Iterable[str]) -> None:
        """Remove records that never reached the queue (the broker refused the send)."""
        records = [r for r in self.get_many(list(job_ids)) if r is not None]
        pipe = self.redis.pipeline(transaction=True)
        for record in records:
            pipe.delete(keys.job(record.job_id))
            pipe.zrem(keys.ALL_JOBS, record.job_id)
            pipe.zrem(keys.status(record.status.value), record.job_id)
            if record.job.batch_id:
                pipe.zrem(keys.batch(record.job.batch_id), record.job_id)
                pipe.hincrby(keys.batch_end(record.job.batch_id), "total", -1)  # never to end
            pipe.zrem(keys.model_jobs(record.job.model), record.job_id)
            pipe.zrem(keys.UNSENT, record.job_id)
            if record.tenant is not None:
                pipe.zrem(keys.tenant_jobs(record.tenant), record.job_id)
        pipe.execute()

    # ------------------------------------------------------------------ read
    def get(self, job_id: str) -> JobRecord | None:
        """The record (a damaged one's stand-in if it does not read back), or None."""
        return parsed(job_id, self.redis.get(keys.job(job_id)))

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []
        raws = self.redis.mget([keys.job(i) for i in job_ids])
        return [parsed(job_id, raw) for job_id, raw in zip(job_ids, raws)]

    def batch(self, batch_id: str) -> list[str]:
        """Job ids of a batch, in submit order."""
        return [i.decode() for i in self.redis.zrange(keys.batch(batch_id), 0, -1)]

    # ------------------------------------------------------------------ list
    def count_of_tenant(self, tenant: str, status: JobStatus) -> int:
        """How many of ``tenant``'s jobs are in ``status`` (intersected on the server)."""
        scratch = keys.scratch(uuid.uuid4().hex)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zinterstore(scratch, [keys.tenant_jobs(tenant), keys.status(status.value)])
        pipe.delete(scratch)
        return pipe.execute()[0]

    def count_by_status(self) -> dict[JobStatus, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in JobStatus:
            pipe.zcard(keys.status(status.value))
        return dict(zip(JobStatus, pipe.execute()))

    def models(self) -> list[str]:
        """Model keys that jobs were submitted for."""
        return sorted(m.decode() for m in self.redis.smembers(keys.MODELS_WITH_JOBS))

    def page(
        self,
        *,
        status: JobStatus | None = None,
        batch: str | None = None,
        model: str | None = None,
        tenant: str | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[JobRecord], int]:
        """Records matching every filter given, newest first, and how many match in all.
        ``tenant``: only that tenant's jobs (None: everyone's).

        Records that have expired are dropped from the indexes as the listing meets them.
        """
        indexes = [keys.ALL_JOBS]
        if status is not None:
            indexes.append(keys.status(status.value))
        if batch is not None:
            indexes.append(keys.batch(batch))
        if model is not None:
            indexes.append(keys.model_jobs(model))
        if tenant is not None:
            indexes.append(keys.tenant_jobs(tenant))
        filters = indexes[1:] or indexes
        pipe = self.redis.pipeline(transaction=True)
        if len(filters) == 1:
            pipe.zcard(filters[0])
            pipe.zrevrange(filters[0], offset, offset + limit - 1)
        else:
            # Intersect on the server into a scratch key: only one page crosses the wire.
            scratch = keys.scratch(uuid.uuid4().hex)
            pipe.zinterstore(scratch, filters, aggregate="MAX")
            pipe.zcard(scratch)
            pipe.zrevrange(scratch, offset, offset + limit - 1)
            pipe.delete(scratch)
        replies = pipe.execute()
        total, ids = (replies[0], replies[1]) if len(filters) == 1 else (replies[1], replies[2])
        ids = [i.decode() for i in ids]
        records = self.get_many(ids)
        expired = [i for i, r in zip(ids, records) if r is None]
        if expired:
            pipe = self.redis.pipeline(transaction=False)
            for key in indexes + [keys.status(s.value) for s in JobStatus]:
                pipe.zrem(key, *expired)
            pipe.execute()
            total -= len(expired)
        return [r for r in records if r is not None], total
