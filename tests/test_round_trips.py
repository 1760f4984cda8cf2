"""lorafleet's own Redis round trips per job, counted on a real Redis: every packet a
connection sends is one round trip (a pipeline or a script is one). Celery's own traffic
(the message, its acknowledgement) is on its own connections and not counted here.
docs/benchmarks.md records the numbers; these tests keep them from growing back."""

from __future__ import annotations

import redis

from lorafleet.common.fleet.lifecycle import Lifecycle
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.worker.conftest import make_runner

STEPS = 4


class CountingConnection(redis.Connection):
    """A redis-py connection that counts what it sends: one packet, one round trip."""

    sent = 0

    def send_packed_command(self, command, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


def _counting(client: redis.Redis) -> None:
    client.connection_pool.disconnect()
    client.connection_pool.connection_class = CountingConnection
    client.connection_pool.reset()  # no connection of the old class is taken again
    client.ping()  # a connection made (and its hello said) before counting starts


def _trips(action) -> tuple[object, int]:
    before = CountingConnection.sent
    result = action()
    return result, CountingConnection.sent - before


def test_a_jobs_transitions_take_one_round_trip_each_and_its_start_two(settings):
    with Client(settings) as client:
        handle = client.submit({"model": TINY, "prompt": "counted", "steps": STEPS, "webhook_url": None})
        store = JobStore(redis.Redis.from_url(settings.broker_url), retention=settings.record_retention)
        _counting(store.redis)
        lifecycle = Lifecycle(store)
        lifecycle.cancel(client.submit({"model": TINY, "prompt": "warm"}).job_id)  # the script loaded
        start_kwargs = dict(
            worker="w", instance="i", attempts_allowed=3, owner_alive=lambda r: False, lost_after=10
        )
        (_, record, run_id), start = _trips(lambda: lifecycle.start(handle.job_id, **start_kwargs))
        assert record.status is JobStatus.running
        assert start == 2  # read the record, then the transition (a fresh process knows nothing of it)
        for step in range(1, STEPS + 1):
            _, progress = _trips(lambda: lifecycle.progress(handle.job_id, run_id, step))
            assert progress == 1
        ended, end = _trips(lambda: lifecycle.end(handle.job_id, JobStatus.succeeded, run_id))
        assert ended.status is JobStatus.succeeded and end == 1  # with every effect of its end
        # a cancel in between costs the next write one more round trip, never a lost cancel
        second = client.submit({"model": TINY, "prompt": "counted", "steps": STEPS})
        _, _, run_id = lifecycle.start(second.job_id, **start_kwargs)
        client.cancel(second.job_id)
        after, progress = _trips(lambda: lifecycle.progress(second.job_id, run_id, 1))
        assert after.cancel_requested and progress == 2


def test_a_start_with_its_messages_hint_is_one_round_trip_and_a_stale_hint_is_never_taken(settings):
    """The message carries the record as queued (``send_job``): the start tries it first, and
    Redis compares it with what is stored, and answers a stale one with the stored record,
    which decides; a hint that is not a record is read past (one more round trip)."""
    with Client(settings) as client:
        store = JobStore(redis.Redis.from_url(settings.broker_url), retention=settings.record_retention)
        hint = {}
        for name in ("fresh", "cancelled", "garbage"):
            job_id = client.submit({"model": TINY, "prompt": name, "steps": STEPS}).job_id
            hint[name] = (job_id, store.redis.get(keys.job(job_id)))
        client.cancel(hint["cancelled"][0])  # after its message (and hint) was sent
        _counting(store.redis)
        lifecycle = Lifecycle(store)
        lifecycle.cancel(client.submit({"model": TINY, "prompt": "warm"}).job_id)  # the script loaded
        start = dict(worker="w", instance="i", attempts_allowed=3, owner_alive=lambda r: False, lost_after=10)

        job_id, queued = hint["fresh"]
        (before, record, run_id), trips = _trips(lambda: lifecycle.start(job_id, guess=queued, **start))
        assert (before, record.status, record.run_id, trips) == (
            JobStatus.queued,
            JobStatus.running,
            run_id,
            1,
        )

        job_id, queued = hint["cancelled"]
        (before, record, _), trips = _trips(lambda: lifecycle.start(job_id, guess=queued, **start))
        # the script answered the stale hint with the stored record, which decided: nothing to write
        assert before is JobStatus.cancelled and record.status is JobStatus.cancelled and trips == 1
        assert store.get(job_id).status is JobStatus.cancelled and not store.get(job_id).runs

        job_id, _ = hint["garbage"]
        (_, record, _), trips = _trips(
            lambda: lifecycle.start(job_id, guess=b'{"job": "not a record"}', **start)
        )
        assert record.status is JobStatus.running and trips == 2


def test_round_trips_of_a_whole_job_on_the_worker_and_its_submit(settings):
    with Client(settings) as client:
        _counting(client.redis)
        handle, submit = _trips(lambda: client.submit({"model": TINY, "prompt": "counted", "steps": STEPS}))
        runner = make_runner(settings.model_copy(update={"max_batch": 1, "background_stages": False}))
        runner.run(client.submit({"model": TINY, "prompt": "warm", "steps": STEPS}).job_id)  # caches warm
        _counting(runner.store.redis)
        status, run = _trips(lambda: runner.run(handle.job_id))
        assert status is JobStatus.succeeded
    print(f"\nround trips: submit {submit}, a {STEPS}-step job on the worker {run}")
    assert submit <= 7  # docs/benchmarks.md: 7
    # start 2 (read, then the transition: no message hint here), the first and the last step's
    # progress writes and those between that come 0.25 s apart (none on a fast machine), the
    # end 1: 5 on a fast machine, as docs/benchmarks.md says; the code before one lifecycle
    # took 21 here (3 per record write, and the end's effects one by one)
    assert 2 + 2 + 1 <= run <= 2 + STEPS + 1
