"""A job's end happens once, in one place (common/fleet/lifecycle.py), on a real Redis: every
way a job ends writes its counters, webhook event and batch count in the same atomic step,
and running that step again changes nothing."""

from __future__ import annotations

import json

import pytest

from lorafleet.common.fleet.lifecycle import IllegalMove, Lifecycle, event_id
from lorafleet.common.fleet.metrics import totals
from lorafleet.common.fleet.queue import queue_depths
from lorafleet.common.fleet.upkeep import hand_back_lost_jobs
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import Superseded
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.services.batches import BatchEnds, batch_event_id
from lorafleet.common.services.sweeps import read_layout
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.test_webhooks import SECRET

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3, "steps": 2}
HOOK = "http://127.0.0.1:9/hooks"  # never called here: the outbox is what is checked


@pytest.fixture
def client(settings):
    hooked = settings.model_copy(update={"webhook_secret": SECRET, "webhook_allow_private": True})
    with Client(hooked) as client:
        yield client


def _start(lifecycle: Lifecycle, job_id: str, instance: str = "instance-1"):
    _, record, run_id = lifecycle.start(
        job_id,
        worker="w@test",
        instance=instance,
        attempts_allowed=3,
        owner_alive=lambda r: False,
        lost_after=10,
    )
    assert record is not None and record.run_id == run_id
    return run_id


def _finished(client) -> dict[str, float]:
    return totals(client.redis)["finished"]


def test_a_jobs_end_writes_its_effects_once_however_often_it_is_ended_again(client):
    handle = client.submit(JOB | {"webhook_url": HOOK})
    lifecycle = Lifecycle(client.jobs)
    run_id = _start(lifecycle, handle.job_id)
    ended = lifecycle.end(handle.job_id, JobStatus.succeeded, run_id)
    assert ended.status is JobStatus.succeeded
    # a retry through an outage, from this process or another that never saw the reply
    for again in (lifecycle, Lifecycle(client.jobs)):
        assert again.end(handle.job_id, JobStatus.succeeded, run_id, error="x").error is None
    assert _finished(client) == {"succeeded": 1.0}
    assert client.redis.zrange(keys.WEBHOOKS_DUE, 0, -1) == [event_id(handle.job_id).encode()]
    assert client.redis.hgetall(keys.batch_end(handle.batch_id)) == {b"total": b"1", b"ended": b"1"}
    # counted, but nothing waits for its end: no batch webhook, no sweep
    assert client.redis.zscore(keys.BATCHES_ENDED, handle.batch_id) is None


def test_a_move_the_table_does_not_allow_is_refused_and_changes_nothing(client):
    handle = client.submit(JOB)
    lifecycle = Lifecycle(client.jobs)
    client.cancel(handle.job_id)

    def revive(record):
        record.status = JobStatus.running
        return record

    with pytest.raises(IllegalMove, match="cancelled -> running is not a legal move"):
        lifecycle.change(handle.job_id, revive)
    assert client.get(handle.job_id).status is JobStatus.cancelled


def test_a_job_cancelled_while_queued_is_counted_and_its_webhook_queued(client):
    handle = client.submit(JOB | {"webhook_url": HOOK})
    assert client.cancel(handle.job_id).status is JobStatus.cancelled
    assert _finished(client) == {"cancelled": 1.0}
    event = json.loads(client.redis.get(keys.webhook_event(event_id(handle.job_id))))
    assert event["payload"]["type"] == "job.cancelled" and event["state"] == "pending"


def test_a_job_cancelled_while_its_worker_was_lost_ends_with_every_effect_of_an_end(client, settings):
    """The issue's case: a two-job sweep with a batch webhook; one job succeeds, the other's
    worker freezes, the job is cancelled, the worker is lost. Both ends are counted, the job's
    event and the batch's are queued, and the grid is drawn."""
    handles = client.sweep(
        {"base": JOB | {"webhook_url": HOOK}, "x": {"name": "seed", "values": [1, 2]}},
        batch_webhook_url=HOOK,
    )
    done, frozen = handles
    lifecycle = Lifecycle(client.jobs)
    lifecycle.end(done.job_id, JobStatus.failed, _start(lifecycle, done.job_id), error="out of memory")
    _start(lifecycle, frozen.job_id, instance="frozen")
    assert client.cancel(frozen.job_id).cancel_requested
    queue = client.get(frozen.job_id).queue
    waiting = sum(queue_depths(client.redis, [queue])[queue].values())
    handed = hand_back_lost_jobs(lifecycle, WorkerRegistry(client.redis), client.celery, 10)
    assert handed == [frozen.job_id]
    # it ends cancelled here: no message is sent for it, and it is not listed unsent
    assert sum(queue_depths(client.redis, [queue])[queue].values()) == waiting
    assert client.redis.zscore(keys.UNSENT, frozen.job_id) is None
    record = client.get(frozen.job_id)
    assert (
        record.status is JobStatus.cancelled
        and record.error == "cancelled while running (its worker was lost)"
    )
    assert _finished(client) == {"failed": 1.0, "cancelled": 1.0}
    assert client.redis.exists(keys.webhook_event(event_id(frozen.job_id)))
    assert BatchEnds(client.jobs, open_storage(settings)).handle_due() == [done.batch_id]
    batch_event = json.loads(client.redis.get(keys.webhook_event(batch_event_id(done.batch_id))))
    assert batch_event["payload"]["data"]["counts"] == {"failed": 1, "cancelled": 1}
    assert len(read_layout(client.redis, done.batch_id)["grids"]) == 1


def test_every_run_is_kept_on_the_record_one_after_another(client):
    handle = client.submit(JOB)
    lifecycle = Lifecycle(client.jobs)
    first = _start(lifecycle, handle.job_id, instance="a")
    (lost,) = hand_back_lost_jobs(lifecycle, WorkerRegistry(client.redis), client.celery, 10)
    assert lost == handle.job_id
    second = _start(lifecycle, handle.job_id, instance="b")
    lifecycle.progress(handle.job_id, second, 1)
    lifecycle.end(handle.job_id, JobStatus.succeeded, second)
    runs = client.get(handle.job_id).runs
    assert [(r.run_id, r.instance, r.outcome) for r in runs] == [
        (first, "a", "handed back"),
        (second, "b", "succeeded"),
    ]
    assert runs[0].ended_at <= runs[1].started_at <= runs[1].ended_at


def test_a_process_never_takes_its_own_last_write_for_the_stored_record(client):
    """Found by the chaos run: a worker started a job, Redis failed over, upkeep handed the
    job back; the worker's next delivery of it must see the queued record, not the running
    one it had written itself (and drop the job as 'running on a live worker')."""
    handle = client.submit(JOB)
    worker = Lifecycle(client.jobs)
    first = _start(worker, handle.job_id, instance="mine")
    record = client.get(handle.job_id)
    assert Lifecycle(client.jobs).hand_back(record, "abandoned") is not None  # upkeep's own instance
    _, started, second = worker.start(
        handle.job_id,
        worker="w@test",
        instance="mine",
        attempts_allowed=3,
        owner_alive=lambda r: r.worker_instance == "mine",  # the worker is alive: its own run would be left
        lost_after=10,
    )
    assert started.status is JobStatus.running and started.run_id == second != first
    assert [r.outcome for r in client.get(handle.job_id).runs] == ["handed back", None]
    # and every other change that would leave a record alone checks what is stored first
    client.cancel(handle.job_id)
    assert worker.progress(handle.job_id, second, 1).cancel_requested


def test_a_run_handed_back_owns_its_job_no_more(client):
    """A worker taken for lost whose run comes back (it was only slow): its writes stop at the
    fence, whatever it tries, and the job stays queued for its next run."""
    handle = client.submit(JOB)
    lifecycle = Lifecycle(client.jobs)
    run_id = _start(lifecycle, handle.job_id)
    assert Lifecycle(client.jobs).hand_back(client.get(handle.job_id), "lost") is not None
    for write in (
        lambda: lifecycle.progress(handle.job_id, run_id, 1),
        lambda: lifecycle.end(handle.job_id, JobStatus.succeeded, run_id),
        lambda: lifecycle.requeue(handle.job_id, run_id, "again", "x", client.get(handle.job_id).timings, []),
    ):
        with pytest.raises(Superseded, match="no longer owns the job"):
            write()
    assert client.get(handle.job_id).status is JobStatus.queued
    assert _finished(client) == {}


def test_a_batchs_index_and_end_tracker_expire_and_count_only_jobs_that_were_queued(client):
    handles = client.submit_many([JOB, JOB | {"seed": 4}])
    batch = handles[0].batch_id
    for name in (keys.batch(batch), keys.batch_end(batch)):
        assert client.redis.ttl(name) > client.settings.record_retention, name
    client.jobs.delete([handles[1].job_id])  # as when the broker refused its message
    assert client.redis.hget(keys.batch_end(batch), "total") == b"1"
    lifecycle = Lifecycle(client.jobs)
    lifecycle.end(handles[0].job_id, JobStatus.succeeded, _start(lifecycle, handles[0].job_id))
    assert client.redis.hget(keys.batch_end(batch), "ended") == b"1"


def test_a_job_handed_back_is_listed_unsent_until_a_run_starts_it(client):
    """Should the hand-back's message be dropped before the record is queued (the worker
    beat again meanwhile), upkeep still finds the queued job and sends it a message."""
    handle = client.submit(JOB)
    client.jobs.sent([handle.job_id])
    lifecycle = Lifecycle(client.jobs)
    _start(lifecycle, handle.job_id)
    hand_back_lost_jobs(lifecycle, WorkerRegistry(client.redis), client.celery, 10)
    assert client.redis.zscore(keys.UNSENT, handle.job_id) is not None
    _start(lifecycle, handle.job_id, instance="next")  # out of queued: its record holds it now
    assert client.redis.zscore(keys.UNSENT, handle.job_id) is None


def test_a_batch_that_ends_again_while_its_end_is_handled_is_handled_again(client, settings):
    handles = client.sweep({"base": JOB, "x": {"name": "seed", "values": [1]}})
    lifecycle = Lifecycle(client.jobs)
    first = handles[0]
    lifecycle.end(first.job_id, JobStatus.failed, _start(lifecycle, first.job_id), error="x")
    ends = BatchEnds(client.jobs, open_storage(settings))
    retried = []

    def handle(batch_id, keep):  # a retry of the cell submitted and ended while the grid is drawn
        if not retried:
            retried.append(client.retry(first.job_id))
            job = retried[0].job_id
            lifecycle.end(job, JobStatus.failed, _start(lifecycle, job), error="y")
        BatchEnds.handle(ends, batch_id, keep)

    ends.handle = handle
    assert ends.handle_due() == [first.batch_id]
    assert client.redis.zscore(keys.BATCHES_ENDED, first.batch_id) is not None  # due again
