"""Upkeep: hand a lost worker's jobs back to the queue (once, within about a minute), send
the messages a dead producer never sent, drop the index entries of expired records, and
delete the input images that no kept job record names any more (common/catalog/input_retention.py).

Every live worker and API process runs an ``Upkeep`` thread, but one process at a time does
the work: each pass first takes (or renews) the lease ``keys.UPKEEP_LEASE`` for
LEASE_SECONDS, as rq's maintenance lock does; a process that dies leaves the lease to
expire and another takes it over. The thread is its own: a slow pass never delays a
heartbeat (worker/heartbeat.py only beats), and the services that hang off a job's end
(webhook deliveries, batch ends, grids) run in yet another thread (services/loop.py).

A running job's record names its worker process (``worker``, ``worker_instance``) and its
run (``run_id``, the fencing token). When that process has not beaten for
``worker_lost_after`` seconds (judged on Redis's clock, fleet/workers.py) it is taken for
lost, whatever Celery's visibility timeout: the upkeep pass sends the job's message again,
then moves the record back to queued through ``fleet.lifecycle`` (a transition fenced on the
same ``run_id``; a cancel asked meanwhile ends it cancelled, with every effect of its end).
The worker that takes the message starts a new run with a new ``run_id``; the lost run, if
it was only slow and comes back, fails its next fenced write and stops without touching
the record (worker/run/runner.py).

A worker also hands back its own abandoned runs (``own``): a running record under its own
process that it no longer runs (Redis failed mid-job and the task gave its message back, or
jobs it had taken from the queue along with one, worker/run/companions.py). Its heartbeat
says it is alive, so nobody else would; it does that every pass, lease or not.

Semantics: a job is never lost (the message is sent before the record moves, by exactly
one process: ``keys.handback`` is taken first), and never runs twice at once (a delivery
that finds the job running under a live worker is dropped).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis
from celery import Celery

from lorafleet.common.catalog.input_images import InputImages
from lorafleet.common.fleet.lifecycle import Lifecycle
from lorafleet.common.fleet.queue import send_job
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobStatus, utcnow

logger = logging.getLogger(__name__)

HANDBACK_SECONDS = 10.0
"""How often each process's upkeep thread wakes (and the lease holder does the work)."""
LEASE_SECONDS = 60.0
"""How long an upkeep lease lasts unless its holder renews it (every pass)."""
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

_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class Lease:
    """A named lease in Redis that one process holds at a time (``take`` also renews it)."""

    def __init__(self, client: redis.Redis, name: str, seconds: float) -> None:
        self.redis, self.name, self.seconds = client, name, seconds
        self.holder = uuid.uuid4().hex
        self._take = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)

    def take(self) -> bool:
        """True if this process holds the lease now, for ``seconds`` more."""
        return bool(self._take(keys=[self.name], args=[self.holder, int(self.seconds * 1000)]))

    def release(self) -> None:
        """Let the lease go if this process still holds it (one step: never another's)."""
        self._release(keys=[self.name], args=[self.holder])


class Upkeep:
    """One process's part in upkeep: ``run`` every HANDBACK_SECONDS does the fleet's upkeep
    while this process holds the lease, and its own abandoned runs always."""

    def __init__(
        self,
        store: JobStore,
        workers: WorkerRegistry,
        app: Celery,
        lost_after: float,
        own: Callable[[], tuple[str, set[str]]] | None = None,
        orphans: set[str] | None = None,
        inputs: InputImages | None = None,
    ) -> None:
        self.store, self.workers, self.app, self.lost_after = store, workers, app, lost_after
        self.inputs = inputs
        """The input images, to delete those no kept job names (None: left alone)."""
        self.orphans = orphans
        """A worker's: jobs whose messages a Redis failure may have lost; listed unsent here."""
        self.lifecycle = Lifecycle(store)
        self.own = own
        """A worker's: (its instance, the jobs it runs now), to hand back its abandoned runs."""
        self.lease = Lease(store.redis, keys.UPKEEP_LEASE, LEASE_SECONDS)
        self._last_trim = float("-inf")

    def run(self) -> bool:
        """One pass; True if this process held the lease and did the fleet's upkeep."""
        if self.orphans:
            ids = list(self.orphans)
            self.store.mark_unsent(ids)  # sent again by upkeep if still queued a while from now
            self.orphans.difference_update(ids)
        if not self.lease.take():
            if self.own is not None:
                hand_back_lost_jobs(
                    self.lifecycle, self.workers, self.app, self.lost_after, self.own, only_own=True
                )
            return False
        hand_back_lost_jobs(self.lifecycle, self.workers, self.app, self.lost_after, self.own)
        send_unsent(self.store, self.app, UNSENT_AFTER)
        if time.monotonic() - self._last_trim >= TRIM_SECONDS:
            self._last_trim = time.monotonic()
            dropped = self.store.trim_indexes(self.store.retention)
            if dropped:
                logger.info("dropped %d expired records from the indexes", dropped)
        if self.inputs is not None:
            gone = self.inputs.expire()  # within its time budget: the next pass goes on
            if gone:
                logger.info("deleted %d input images that no kept job names", len(gone))
        return True


class Periodic:
    """A daemon thread that calls ``work`` every ``interval`` seconds until ``stop``; an
    error is logged and the next call comes on time (Redis away, a broker hiccup)."""

    def __init__(self, name: str, work: Callable[[], object], interval: float) -> None:
        self.work, self.interval = work, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.work()
            except (redis.RedisError, OSError) as exc:
                logger.warning("%s: %s", self._thread.name, exc)
            except Exception:  # the thread must outlive anything
                logger.exception("%s: unexpected error; going on", self._thread.name)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, wait: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait)


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
    lifecycle: Lifecycle,
    workers: WorkerRegistry,
    app: Celery,
    lost_after: float,
    own: Callable[[], tuple[str, set[str]]] | None = None,
    only_own: bool = False,
) -> list[str]:
    """Hand back the running jobs whose worker is lost, and (``own``) this worker's abandoned
    runs (``only_own``: those alone); returns their ids."""
    store = lifecycle.store
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
        if not abandoned and (
            only_own or workers.owner_alive(record.worker, record.worker_instance, lost_after)
        ):
            continue
        run = record.run_id or "-"
        if not store.redis.set(keys.handback(record.job_id, run), "1", nx=True, ex=HANDBACK_HOLD_SECONDS):
            continue  # another process hands this run back
        try:
            # listed unsent first: should its next delivery be dropped before the record is
            # queued (its worker beat again meanwhile), upkeep sends the queued job a new one;
            # a job with a cancel asked ends cancelled below and needs no message
            if not record.cancel_requested:
                store.mark_unsent([record.job_id])
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
        try:
            moved = lifecycle.hand_back(record, note)
        except redis.RedisError as exc:
            logger.warning("job %s: record not moved back to queued: %s", record.job_id, exc)
            moved = None
        if moved is None:
            _let_go(store, record.job_id, run)  # tried again on the next pass
            continue
        logger.warning("job %s: %s", record.job_id, note)
        handed.append(record.job_id)
    return handed


def _let_go(store: JobStore, job_id: str, run: str) -> None:
    try:
        store.redis.delete(keys.handback(job_id, run))
    except redis.RedisError:
        pass  # Redis is away: the hold expires by itself
