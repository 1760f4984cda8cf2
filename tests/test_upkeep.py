"""Upkeep: the message of a producer that died between writing a record and sending it is
sent; the indexes forget expired records."""

from __future__ import annotations

import time

from lorafleet.common.fleet.upkeep import Lease, send_unsent
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, JobStatus
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.producer.test_client import queued_messages
from tests.worker.conftest import make_runner


def test_a_record_whose_message_was_never_sent_gets_it_and_runs(settings):
    with Client(settings) as client:
        resolved = client.resolver.resolve(GenerationJob(model=TINY, prompt="orphan", batch_id="b1"))
        record = JobRecord(job=resolved.job, queue=resolved.model.queue)
        client.jobs.create_many([record])  # the producer dies here, before sending
        assert queued_messages(client) == [] and client.jobs.unsent(0) == [record.job_id]
        assert send_unsent(client.jobs, client.celery, after=3600) == []  # too young to be orphaned
        assert send_unsent(client.jobs, client.celery, after=0) == [record.job_id]
        assert [m["headers"]["id"] for m in queued_messages(client)] == [record.job_id]
        assert client.jobs.unsent(0) == []
        assert send_unsent(client.jobs, client.celery, after=0) == []  # once
        assert make_runner(settings).run(record.job_id) is JobStatus.succeeded


def test_submitted_jobs_are_not_left_as_unsent(settings):
    with Client(settings) as client:
        client.submit_many([{"model": TINY, "prompt": "sent"}] * 3)
        assert client.jobs.unsent(0) == []


def test_expired_records_leave_every_index(settings):
    short = settings.model_copy(update={"record_retention": 60})
    with Client(short) as client:
        handles = client.submit_many([{"model": TINY, "prompt": "short-lived"}] * 2)
        gone, kept = handles
        client.redis.delete(keys.job(gone.job_id))  # as if its retention ran out
        old = time.time() - 3600
        client.redis.zadd(keys.ALL_JOBS, {gone.job_id: old, kept.job_id: old})
        assert client.jobs.trim_indexes(older_than=60) == 1
        for index in [keys.ALL_JOBS, keys.status("queued"), keys.model_jobs(TINY)]:
            assert client.redis.zscore(index, gone.job_id) is None, index
            assert client.redis.zscore(index, kept.job_id) is not None, index
        assert 0 < client.redis.ttl(keys.batch(gone.batch_id)) <= 2 * 60 + 24 * 3600


def test_a_worker_hands_back_its_own_run_that_redis_cut_short(settings):
    """Redis failed mid-job, so the task gave its message back to a Redis that lost it: the
    record stays running under this live worker, which no other process would hand back."""
    from datetime import timedelta

    from lorafleet.common.fleet.upkeep import hand_back_lost_jobs
    from lorafleet.common.fleet.workers import WorkerBeat, WorkerRegistry

    with Client(settings) as client:
        handle = client.submit({"model": TINY, "prompt": "cut short"})
        runner = make_runner(settings)
        before, started = runner._start(handle.job_id)
        assert started.status is JobStatus.running
        client.redis.delete(*keys.priority_lists(started.queue))  # its message is gone
        workers = WorkerRegistry(client.redis)
        now = time.time()
        workers.beat(  # the worker is alive: nobody else hands its jobs back
            WorkerBeat(
                name="test-worker",
                instance=runner.instance,
                host="h",
                pid=1,
                version="0",
                device="cpu",
                started_at=now,
                last_seen=now,
            )
        )
        own = lambda: (runner.instance, set())  # noqa: E731  (it runs nothing now)
        # a run just started is the worker's own business, not abandoned
        assert hand_back_lost_jobs(client.lifecycle, workers, client.celery, 3600, own) == []

        def long_ago(record):
            record.started_at -= timedelta(seconds=60)
            return record

        client.lifecycle.change(handle.job_id, long_ago)
        busy = lambda: (runner.instance, {handle.job_id})  # noqa: E731
        assert hand_back_lost_jobs(client.lifecycle, workers, client.celery, 3600, busy) == []  # it runs it
        assert hand_back_lost_jobs(client.lifecycle, workers, client.celery, 3600, own) == [handle.job_id]
        record = client.get(handle.job_id)
        assert record.status is JobStatus.queued and "abandoned" in record.warnings[-1]
        assert [m["headers"]["id"] for m in queued_messages(client)] == [handle.job_id]
        assert make_runner(settings).run(handle.job_id) is JobStatus.succeeded


def test_a_job_whose_start_met_a_redis_failure_gets_a_message_again(settings):
    """Found by a fresh-clone run: the primary crashed while a worker started a job; its
    start failed, and so did giving the message back (no master yet), so the queued record
    had no message until the visibility timeout (an hour). The task now remembers the job,
    and upkeep lists it unsent once Redis is back; a minute later it is sent again."""
    import redis
    from celery.exceptions import Reject

    from lorafleet.common.fleet.lifecycle import Lifecycle
    from lorafleet.common.fleet.store import JobStore
    from lorafleet.common.fleet.upkeep import Upkeep
    from lorafleet.common.fleet.workers import WorkerRegistry
    from lorafleet.worker.tasks import register_tasks
    from tests.helpers import free_port

    with Client(settings) as client:
        handle = client.submit({"model": TINY, "prompt": "orphaned"})
        client.redis.delete(*keys.priority_lists(handle.record().queue))  # its message is lost
        runner = make_runner(settings)
        away = redis.Redis(port=free_port(), socket_connect_timeout=1)  # Redis, as the worker sees it
        runner.lifecycle = Lifecycle(JobStore(away, retention=settings.record_retention))
        register_tasks(client.celery, runner)
        try:
            client.celery.tasks["lorafleet.generate"](handle.job_id)
        except Reject:
            pass
        assert runner.orphans == {handle.job_id}
        Upkeep(client.jobs, WorkerRegistry(client.redis), client.celery, 30, orphans=runner.orphans).run()
        assert not runner.orphans and client.redis.zscore(keys.UNSENT, handle.job_id) is not None
        assert send_unsent(client.jobs, client.celery, 0) == [handle.job_id]
        assert len(queued_messages(client)) == 1


def test_a_lease_is_let_go_only_by_its_holder(settings):
    with Client(settings) as client:
        first = Lease(client.redis, "lorafleet:test:lease", 30)
        second = Lease(client.redis, "lorafleet:test:lease", 30)
        assert first.take() and not second.take()
        second.release()  # not its lease: nothing happens
        assert not second.take() and first.take()
        first.release()
        assert second.take()
