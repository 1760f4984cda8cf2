"""Upkeep that any live worker or the API does: hand a lost worker's jobs back to the queue
(once, within about a minute), send the messages a dead producer never sent, and drop the
index entries of expired records.

A running job's record names its worker process (``worker``, ``worker_instance``) and its
run (``run_id``, the fencing token). When that process has not beaten for
``worker_lost_after`` seconds it is taken for lost, whatever Celery's visibility timeout:
every HANDBACK_SECONDS, each live worker's heartbeat thread and the API look at the
running jobs, and for each one whose worker is lost, the first to take
``keys.handback(job, run)`` sends the job's message again and moves the record back to
queued (a compare-and-set on the same ``run_id``; a cancel asked meanwhile ends it
cancelled instead). The worker that takes the message starts a new run with a new
``run_id``; the lost run, if it was only slow and comes back, fails its next fenced write
and stops without touching the record (worker/run/runner.py).

A worker also hands back its own abandoned runs: a running record under its own process
that it no longer runs (Redis failed mid-job and the task gave its message back, or jobs it
had taken from the queue along with one, worker/run/companions.py). Its heartbeat says it is alive,
so nobody else would.

Semantics: a job is never lost (the message is sent before the record moves, by exactly
one process), and never runs twice at once (a delivery that finds the job running under a
live worker is dropped). A message Celery restores after the visibility timeout is such a
delivery, or finds the job ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from celery import Celery

from lorafleet.common.fleet.queue import send_job
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobRecord, JobStatus, Progress, utcnow
from lorafleet.common.services.grids import GridBuilder
from lorafleet.common.services.webhooks import WebhookSender

logger = logging.getLogger(__name__)

HANDBACK_SECONDS = 10.0
"""How often live workers and the API look for jobs of lost workers."""
HANDBACK_HOLD_SECONDS = 60
"""How long the one process handing a run back holds it (the others leave it alone); a hand
back cut short (Redis failing over) is tried again after it."""
ABANDONED_AFTER = 10.0
"""Seconds a running record of this worker process must have been started before the worker
takes it for abandoned when it does not run it (a run just starting registers at once)."""
UNSENT_AFTER = 60.0
"""Seconds after which a record whose message was never sent (its producer died between the
two writes) has its message sent by upkeep."""
TRIM_SECONDS = 600.0
"""How often upkeep drops the index entries of expired records."""


class Upkeep:
    """One process's share of upkeep: ``run`` every HANDBACK_SECONDS (the index trim runs
    every TRIM_SECONDS of those)."""

    def __init__(
        self,
        store: JobStore,
        workers: WorkerRegistry,
        app: Celery,
        lost_after: float,
        own: Callable[[], tuple[str, set[str]]] | None = None,
        webhooks: WebhookSender | None = None,
        grids: GridBuilder | None = None,
    ) -> None:
        self.store, self.workers, self.app, self.lost_after = store, workers, app, lost_after
        self.own = own
        self.webhooks = webhooks
        self.grids = grids
        """A worker's: (its instance, the jobs it runs now), to hand back its abandoned runs."""
        self._last_trim = float("-inf")

    def run(self) -> None:
        hand_back_lost_jobs(self.store, self.workers, self.app, self.lost_after, self.own)
        send_unsent(self.store, self.app, UNSENT_AFTER)
        if self.webhooks is not None:
            self.webhooks.deliver_due()
        if self.grids is not None:
            self.grids.build_due()
        if time.monotonic() - self._last_trim >= TRIM_SECONDS:
            self._last_trim = time.monotonic()
            dropped = self.store.trim_indexes(self.store.retention)
            if dropped:
                logger.info("dropped %d expired records from the indexes", dropped)


def send_unsent(store: JobStore, app: Celery, after: float) -> list[str]:
    """Send the messages of queued records that were written ``after`` seconds ago or more but
    never sent (a producer died in between); returns their ids."""
    sent = []
    for job_id in store.unsent(after):
        if not store.redis.set(keys.handback(job_id, "unsent"), "1", nx=True, ex=HANDBACK_HOLD_SECONDS):
            continue
        record = store.get(job_id)
        if record is not None and not record.damaged and record.status is JobStatus.queued:
            send_job(app, record)
            logger.warning("job %s: its producer never sent its message; sent now", job_id)
            sent.append(job_id)
        store.sent([job_id])
    return sent


def hand_back_lost_jobs(
    store: JobStore,
    workers: WorkerRegistry,
    app: Celery,
    lost_after: float,
    own: Callable[[], tuple[str, set[str]]] | None = None,
) -> list[str]:
    """Hand back the running jobs whose worker is lost, and (``own``) this worker's abandoned
    runs; returns their ids."""
    ids = [i.decode() for i in store.redis.zrange(keys.status(JobStatus.running.value), 0, -1)]
    instance, running = own() if own is not None else (None, set())
    handed = []
    for record in store.get_many(ids):
        if record is None or record.damaged or record.status is not JobStatus.running:
            continue
        abandoned = (
            instance is not None
            and record.worker_instance == instance
            and record.job_id not in running
            and record.started_at is not None
            and (utcnow() - record.started_at).total_seconds() > ABANDONED_AFTER
        )
        if not abandoned and workers.owner_alive(record.worker, record.worker_instance, lost_after):
            continue
        run = record.run_id or "-"
        if not store.redis.set(keys.handback(record.job_id, run), "1", nx=True, ex=HANDBACK_HOLD_SECONDS):
            continue  # another process hands this run back
        try:
            send_job(app, record)
        except Exception as exc:  # kombu and redis raise many kinds: all mean "not sent"
            _let_go(store, record.job_id, run)
            logger.warning("job %s: its run could not be handed back yet: %s", record.job_id, exc)
            continue
        note = (
            f"its run {record.attempts} on {record.worker} was abandoned (Redis failed mid-job); "
            "the job was handed back to the queue"
            if abandoned
            else f"worker {record.worker} was lost (no heartbeat for {lost_after:g} s) during run "
            f"{record.attempts}; the job was handed back to the queue"
        )
        if _requeue(store, record, note):
            handed.append(record.job_id)
        else:
            _let_go(store, record.job_id, run)  # tried again on the next pass
    return handed


def _let_go(store: JobStore, job_id: str, run: str) -> None:
    try:
        store.redis.delete(keys.handback(job_id, run))
    except redis.RedisError:
        pass  # Redis is away: the hold expires by itself


def _requeue(store: JobStore, seen: JobRecord, note: str) -> bool:
    moved: list[JobStatus] = []

    def change(current: JobRecord) -> JobRecord | None:
        if current.status is not JobStatus.running or current.run_id != seen.run_id:
            return None  # it ended, or another run took it over meanwhile
        if current.cancel_requested:
            current.status, current.finished_at = JobStatus.cancelled, utcnow()
            current.error = "cancelled while running (its worker was lost)"
        else:
            current.status = JobStatus.queued
            current.progress = Progress(step=0, total=current.progress.total)
        current.warnings = [*current.warnings, note]
        moved.append(current.status)
        return current

    try:
        store.update(seen.job_id, change)
    except redis.RedisError as exc:
        logger.warning("job %s: record not moved back to queued: %s", seen.job_id, exc)
        return False
    if moved:
        logger.warning("job %s: %s", seen.job_id, note)
    return bool(moved)
