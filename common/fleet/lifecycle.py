"""A job's lifecycle: every change of a job record, each one atomic step with all its effects.

::

    queued ──start──► running ──end──► succeeded | failed | cancelled
      │  ▲               │ ▲ │
      │  └──requeue──────┘ │ └─start (another run takes over a lost worker's job)
      │  └──hand_back──────┘
      └──cancel / start (cancelled or out of attempts)──► cancelled | failed

``MOVES`` is the table of legal moves; a change that would make any other move is refused
(``IllegalMove``), and a record that has ended never changes again. The producer, the API,
the worker and upkeep change records only through this module.

Semantics: each transition is one server-side script (``_TRANSITION``) that writes the new
record only if the stored one is still the one the change was computed from (so the run's
fencing token, ``run_id``, and ``cancel_requested`` are checked in the same atomic step),
moves the status index, adds the change to the event stream and, when the job ends, writes
every effect of its end: the fleet's counters, the job's webhook event in the outbox, and
its batch's end count (``keys.batch_end``; a batch with a consumer, a batch webhook or a
sweep's grid, is put on ``keys.BATCHES_ENDED`` when its last job ends, for services/batches.py). A job ends in exactly one transition (a final
record never moves again), so its end's effects are written once, whoever ends it and
however often a caller retries through a Redis outage.

Round trips: a process remembers the record it last wrote for each job it changes (as stored
and as parsed back, so the next change parses nothing) and tries the change against it
first; a worker's start tries it against the record the job's message carries, as the
producer stored it. The script answers a stale guess with the stored record, so a start, a
progress write or a run's end is one round trip unless someone else changed the record (a
cancel, a requeue), then two. A guess is never taken for the stored record: a change that
finds nothing to write on a guess, or a guess that does not parse, reads what is stored and
decides again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from lorafleet.common.fleet import events
from lorafleet.common.fleet.store import JobStore, parsed, read_back, score
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import LorafleetError, Superseded
from lorafleet.common.schema.hires import sampled_steps
from lorafleet.common.schema.jobs import PHASES, JobRecord, JobStatus, Progress, Run, Timings, utcnow

logger = logging.getLogger(__name__)

Change = Callable[[JobRecord], "JobRecord | None"]

_S = JobStatus
MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    _S.queued: frozenset({_S.running, _S.cancelled, _S.failed}),
    _S.running: frozenset({_S.running, _S.queued, _S.succeeded, _S.failed, _S.cancelled}),
    _S.succeeded: frozenset(),
    _S.failed: frozenset(),
    _S.cancelled: frozenset(),
}
"""Status -> the statuses a record in it may move to (running -> running: progress, or a new
run taking over a lost worker's job)."""

WEBHOOK_KEEP_SECONDS = 7 * 24 * 3600
"""How long a webhook event and its attempts stay readable (services/webhooks.py delivers)."""
REMEMBERED = 4096
"""Records this process remembers having written (its guesses for the next change)."""

_TRANSITION = """
-- KEYS: the record, its status index before, its status index after, the event stream, the
--       queued index, the unsent list
-- ARGV: the record as guessed, the new record, job id, score, seconds to keep it (0: for good),
--       the event's fields (JSON), events kept, the end's effects (JSON, or '' unless it ends)
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return {0, current} end
redis.call('SET', KEYS[1], ARGV[2])
if KEYS[2] ~= KEYS[3] then
    redis.call('ZREM', KEYS[2], ARGV[3])
    redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
    -- out of queued: whatever message it had or lacked, its record holds it now
    if KEYS[2] == KEYS[5] then redis.call('ZREM', KEYS[6], ARGV[3]) end
end
if ARGV[5] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
local event = {}
for name, value in pairs(cjson.decode(ARGV[6])) do
    table.insert(event, name)
    table.insert(event, tostring(value))
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', unpack(event))
if ARGV[8] == '' then return {1} end
local e = cjson.decode(ARGV[8])
for _, h in ipairs(e.hincr) do redis.call(h[1], h[2], h[3], h[4]) end
for _, c in ipairs(e.incr) do
    redis.call('INCRBY', c[1], c[2])
    redis.call('EXPIRE', c[1], c[3])
end
if e.outbox then
    local o = e.outbox
    if redis.call('SET', o.key, o.entry, 'NX', 'EX', o.keep) then
        redis.call('ZADD', o.due, o.at, o.id)
    end
end
if e.batch and redis.call('EXISTS', e.batch.key) == 1 then
    local ended = redis.call('HINCRBY', e.batch.key, 'ended', 1)
    local total = tonumber(redis.call('HGET', e.batch.key, 'total') or '0')
    -- due for its consumers, if it has any (a batch webhook, a sweep's grid); due again if
    -- it ends again while one is handling it (services/batches.py keeps it then)
    if ended >= total and redis.call('EXISTS', unpack(e.batch.consumers)) > 0 then
        redis.call('ZADD', e.batch.due, e.batch.at, e.batch.id)
    end
end
return {1}
"""


class IllegalMove(LorafleetError):
    """A change that the table of legal moves does not allow (a bug in its caller)."""


# ---------------------------------------------------------------------- the end's effects
def event_id(job_id: str) -> str:
    """The webhook event id of a job's end (Standard Webhooks' ``webhook-id``)."""
    return f"msg_{job_id}"


def job_event(record: JobRecord) -> dict[str, Any]:
    """The webhook event a job's end sends: its type, when, and the record's summary."""
    return {
        "type": f"job.{record.status.value}",
        "timestamp": (record.finished_at or datetime.now(timezone.utc)).isoformat(),
        "data": {
            "job_id": record.job_id,
            "batch_id": record.job.batch_id,
            "status": record.status.value,
            "error": record.error,
            "model": record.job.model,
            "seed": record.job.seed,
            "tags": record.job.tags,
            "images": [{"uri": i.uri, "sha256": i.sha256, "seed": i.seed} for i in record.images],
            "seconds": record.timings.total,
        },
    }


def outbox_entry(id_: str, url: str, payload: dict[str, Any], now: float) -> str:
    """A webhook event as the outbox keeps it (services/webhooks.py delivers and updates it)."""
    entry = {"id": id_, "url": url, "payload": payload, "created": now, "state": "pending", "attempts": []}
    return json.dumps(entry)


def end_effects(record: JobRecord, now: float) -> dict[str, Any]:
    """What a job's end writes beside its record (``_TRANSITION`` runs it)."""
    hincr: list[list[Any]] = [["HINCRBY", keys.STATS_FINISHED, record.status.value, 1]]
    for phase in PHASES:
        value = getattr(record.timings, phase)
        if value is not None:
            hincr.append(["HINCRBYFLOAT", keys.STATS_PHASES, f"{phase}:sum", repr(float(value))])
            hincr.append(["HINCRBY", keys.STATS_PHASES, f"{phase}:count", 1])
    for name in ("hits", "misses"):
        if count := getattr(record.timings, f"lora_{name}"):
            hincr.append(["HINCRBY", keys.STATS_LORA, name, count])
    minute = int(now // 60)
    incr = [
        [key, len(record.images), keys.STATS_IMAGES_TTL]
        for key in (keys.images_in_minute(minute), keys.model_images_in_minute(record.job.model, minute))
        if record.images
    ]
    effects: dict[str, Any] = {"hincr": hincr, "incr": incr}
    if record.job.webhook_url:
        id_ = event_id(record.job_id)
        effects["outbox"] = {
            "key": keys.webhook_event(id_),
            "entry": outbox_entry(id_, record.job.webhook_url, job_event(record), now),
            "keep": WEBHOOK_KEEP_SECONDS,
            "due": keys.WEBHOOKS_DUE,
            "id": id_,
            "at": now,
        }
    if record.job.batch_id:
        effects["batch"] = {
            "key": keys.batch_end(record.job.batch_id),
            "consumers": [keys.batch_webhook(record.job.batch_id), keys.sweep(record.job.batch_id)],
            "due": keys.BATCHES_ENDED,
            "id": record.job.batch_id,
            "at": now,
        }
    return effects


def _close_run(record: JobRecord, outcome: str) -> None:
    """Close the record's current run (``record.run_id``) with ``outcome``, now."""
    for run in reversed(record.runs):
        if run.run_id == record.run_id and run.ended_at is None:
            run.ended_at, run.outcome = utcnow(), outcome
            return


class Lifecycle:
    """The transitions of job records in one Redis; safe to share between threads."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.redis = store.redis
        self._transition = self.redis.register_script(_TRANSITION)
        self._written: dict[str, tuple[bytes, JobRecord]] = {}
        """Job id -> the record this process last wrote, as stored and parsed back (its guess
        for the next change; taken out while a change uses it, so no two threads share it)."""
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the one way to change
    def change(self, job_id: str, change: Change, *, guess: str | bytes | None = None) -> JobRecord | None:
        """Apply ``change`` atomically: it returns the new record, or None to leave the record
        as it is. Returns what is stored afterwards (None if there is no record; a damaged
        record's stand-in, unchanged). IllegalMove if the change breaks ``MOVES``. ``guess``:
        what the caller believes is stored (tried first when this process remembers nothing)."""
        key = keys.job(job_id)
        raw, before = self._take_guess(job_id, guess)
        guessed = raw is not None  # what this process wrote last, or the caller's belief
        if not guessed:
            raw = self.redis.get(key)
        while True:
            if before is None:
                before = parsed(job_id, raw)
            if before is None or before.damaged:
                self._written.pop(job_id, None)
                return before
            status_before = before.status
            after = change(before)  # may change ``before`` in place: no one else holds it
            if after is None:
                if guessed:  # nothing to write says nothing of a guess: read what is stored
                    guessed, raw, before = False, self.redis.get(key), None
                    continue
                return before
            if after.status not in MOVES[status_before]:
                raise IllegalMove(
                    f"job {job_id}: {status_before.value} -> {after.status.value} is not a legal move",
                    job_id=job_id,
                )
            new, new_parsed = read_back(after)
            ends = after.status.final and not status_before.final
            reply = self._transition(
                keys=[
                    key,
                    keys.status(status_before.value),
                    keys.status(after.status.value),
                    keys.EVENTS,
                    keys.status(JobStatus.queued.value),
                    keys.UNSENT,
                ],
                args=[
                    raw,
                    new,
                    job_id,
                    score(after),
                    self.store.retention if after.status.final else 0,
                    json.dumps(events.fields(after)),
                    keys.EVENTS_KEPT,
                    json.dumps(end_effects(after, time.time())) if ends else "",
                ],
            )
            if reply[0] == 1:
                self._remember(job_id, None if after.status.final else (new.encode(), new_parsed))
                return after
            # someone else changed it: again on what is stored
            guessed, raw, before = False, reply[1] or None, None

    def _take_guess(self, job_id: str, guess: str | bytes | None) -> tuple[bytes | None, JobRecord | None]:
        """(raw, parsed) of the first guess for a change of the job: what this process wrote
        last (taken out), else ``guess`` if it parses, else (None, None): read what is stored."""
        with self._lock:
            remembered = self._written.pop(job_id, None)
        if remembered is not None:
            return remembered
        if guess is None:
            return None, None
        raw = guess.encode() if isinstance(guess, str) else guess
        try:
            return raw, JobRecord.model_validate_json(raw)
        except ValidationError:  # a hint, not a record: read what is stored instead
            return None, None

    def _remember(self, job_id: str, written: tuple[bytes, JobRecord] | None) -> None:
        with self._lock:  # the store stage's threads and the API's end jobs beside each other
            if written is None:
                self._written.pop(job_id, None)
                return
            if len(self._written) >= REMEMBERED:
                self._written.pop(next(iter(self._written)), None)
            self._written[job_id] = written

    # ------------------------------------------------------------------ transitions
    def start(
        self,
        job_id: str,
        *,
        worker: str,
        instance: str,
        attempts_allowed: int,
        owner_alive: Callable[[JobRecord], bool],
        lost_after: float,
        guess: str | bytes | None = None,
    ) -> tuple[JobStatus | None, JobRecord | None, str]:
        """Take the job for a new run: (its status before, the record after, the run's id).

        A job already ended is left alone, and so is one running under a live worker (a second
        delivery); one cancelled while queued ends cancelled; one that started
        ``attempts_allowed`` times without finishing ends failed; any other starts here (a
        running one whose worker is lost is taken over: that run is closed as lost).
        """
        before: list[JobStatus] = []
        run_id = uuid.uuid4().hex

        def change(record: JobRecord) -> JobRecord | None:
            before.append(record.status)
            if record.status.final:
                return None
            if record.status is JobStatus.running and owner_alive(record):
                return None
            if record.cancel_requested:
                _close_run(record, "cancelled")
                record.status, record.finished_at = JobStatus.cancelled, utcnow()
                record.error = "cancelled before it ran"
                return record
            if record.attempts >= attempts_allowed:
                _close_run(record, "lost")
                record.status, record.finished_at = JobStatus.failed, utcnow()
                record.error = (
                    f"started {record.attempts} times without finishing (the worker running it was lost: "
                    "killed or out of memory); not retried again"
                )
                return record
            if record.status is JobStatus.running:
                _close_run(record, "lost")
                record.warnings = [
                    *record.warnings,
                    f"worker {record.worker} was lost (no heartbeat for {lost_after:g} s) during run "
                    f"{record.attempts}; run {record.attempts + 1} on {worker} took the job over",
                ]
            now = utcnow()
            record.status = JobStatus.running
            record.attempts += 1
            record.started_at = now
            record.worker, record.worker_instance, record.run_id = worker, instance, run_id
            record.runs = [*record.runs, Run(run_id=run_id, worker=worker, instance=instance, started_at=now)]
            record.progress = Progress(step=0, total=sampled_steps(record.job) * record.job.num_images)
            record.timings = Timings(queue_wait=(now - record.submitted_at).total_seconds())
            return record

        record = self.change(job_id, change, guess=guess)
        return (before[-1] if before else None), record, run_id

    def progress(
        self, job_id: str, run_id: str | None, step: int, total: int | None = None
    ) -> JobRecord | None:
        """Write the run's progress (``total``: its count of steps, where the run counts them
        otherwise than the start did); Superseded if another run owns the job now."""

        def change(record: JobRecord) -> JobRecord | None:
            _fence(record, run_id)
            if record.status is not JobStatus.running:
                return None  # no run writes it (run_id None): nothing to count
            record.progress.step = step
            if total is not None:
                record.progress.total = total
            return record

        return self.change(job_id, change)

    def end(
        self, job_id: str, status: JobStatus, run_id: str | None = None, **fields: Any
    ) -> JobRecord | None:
        """End the run's job in ``status``, setting ``fields``; Superseded if another run owns
        it. A job that has ended already is left as it is (returned)."""
        assert status.final, status

        def change(record: JobRecord) -> JobRecord | None:
            if record.status.final and (run_id is None or (record.run_id, record.status) == (run_id, status)):
                return None  # ended already (by this run: a retry whose first reply was lost)
            _fence(record, run_id)
            _close_run(record, status.value)
            record.status = status
            record.finished_at = utcnow()
            for name, value in fields.items():
                setattr(record, name, value)
            return record

        return self.change(job_id, change)

    def requeue(
        self, job_id: str, run_id: str | None, note: str, message: str, timings: Timings, warnings: list[str]
    ) -> JobRecord | None:
        """A run met a transient failure: the job goes back to queued (``note`` added to its
        warnings), or ends cancelled if a cancel was asked meanwhile."""

        def change(current: JobRecord) -> JobRecord | None:
            _fence(current, run_id)
            if current.status is not JobStatus.running:
                return None
            current.timings = timings
            if current.cancel_requested:
                _close_run(current, "cancelled")
                current.status, current.finished_at = JobStatus.cancelled, utcnow()
                current.error = f"cancelled while running (the run had met a transient failure: {message})"
                current.warnings = warnings
                return current
            _close_run(current, "queued again")
            current.status = JobStatus.queued
            current.progress = Progress(step=0, total=current.progress.total)
            current.warnings = [*warnings, note]
            return current

        return self.change(job_id, change)

    def hand_back(self, seen: JobRecord, note: str) -> JobRecord | None:
        """The run ``seen`` of a lost (or abandoned) worker: the job goes back to queued, or
        ends cancelled if a cancel was asked. None if the record moved on meanwhile."""
        moved: list[JobRecord] = []

        def change(current: JobRecord) -> JobRecord | None:
            if current.status is not JobStatus.running or current.run_id != seen.run_id:
                return None  # it ended, or another run took it over meanwhile
            if current.cancel_requested:
                _close_run(current, "cancelled")
                current.status, current.finished_at = JobStatus.cancelled, utcnow()
                current.error = "cancelled while running (its worker was lost)"
            else:
                _close_run(current, "handed back")
                current.status = JobStatus.queued
                current.progress = Progress(step=0, total=current.progress.total)
            current.warnings = [*current.warnings, note]
            moved.append(current)
            return current

        stored = self.change(seen.job_id, change)
        return stored if moved and stored is moved[-1] else None  # what was written, if anything

    def cancel(self, job_id: str) -> JobRecord | None:
        """A queued job ends cancelled now; a running one is asked to stop (its run ends it)."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.status is JobStatus.queued:
                record.status = JobStatus.cancelled
                record.finished_at = utcnow()
                record.error = "cancelled before it ran"
                return record
            if record.status is JobStatus.running and not record.cancel_requested:
                record.cancel_requested = True
                return record
            return None

        return self.change(job_id, change)


def _fence(record: JobRecord, run_id: str | None) -> None:
    """Superseded unless run ``run_id`` (None: no run, the caller is not a worker) still owns
    the record: it is running, under this run. Checked inside the transition's atomic step."""
    if run_id is not None and (record.run_id != run_id or record.status is not JobStatus.running):
        raise Superseded(
            f"run {run_id[:8]} of this worker no longer owns the job (now "
            f"{record.status.value}, run {str(record.run_id)[:8]} on {record.worker})",
            job_id=record.job_id,
        )
