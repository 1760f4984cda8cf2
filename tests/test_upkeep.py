"""Upkeep: the message of a producer that died between writing a record and sending it is
sent; the indexes forget expired records."""

from __future__ import annotations

import time

from lorafleet.common import keys
from lorafleet.common.handback import send_unsent
from lorafleet.common.jobs import GenerationJob, JobRecord, JobStatus
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
