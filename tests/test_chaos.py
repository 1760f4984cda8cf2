"""A chaos run with real processes: 300 jobs over two models and two workers while a worker is
killed and restarted, the Redis primary fails over (Sentinel) and the object store is down for
20 s. At the end every job has ended exactly once (succeeded, or failed saying why), every
image of a succeeded job is in the store once, every job's webhook event and its batch's
were delivered, signed, and no job ran on two workers at the same time: all checked from what
lorafleet wrote (the records with their runs, the end counters, the store, what a receiver
got), never from log lines."""

from __future__ import annotations

import time

import boto3
import pytest
import redis

from lorafleet.common.fleet.lifecycle import event_id
from lorafleet.common.fleet.metrics import totals
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.batches import batch_event_id
from lorafleet.producer import Client
from tests.conftest import TINY, TINY_SD2, copy_home
from tests.helpers import SentinelRedis, TcpProxy, WorkerProcess, lorafleet_env, s3_env, wait_until
from tests.test_webhooks import SECRET, Receiver

pytestmark = pytest.mark.slow

JOBS = 300
BUCKET = "chaos"
STORE_OUTAGE = 20.0


def test_every_job_ends_once_through_a_killed_worker_a_failover_and_a_store_outage(
    template_home, tmp_path, s3_credentials
):
    sentinel_redis = SentinelRedis(tmp_path / "redis").start()
    moto = s3_credentials
    store = TcpProxy(moto.port).up()
    receiver = Receiver()  # every job's webhook and its batch's
    boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(
        home,
        sentinel_redis.url,
        f"s3://{BUCKET}/out",
        LORAFLEET_WORKER_LOST_AFTER="10",
        LORAFLEET_WEBHOOK_SECRET=SECRET,
        LORAFLEET_WEBHOOK_ALLOW_PRIVATE="true",
        OMP_NUM_THREADS="1",  # two workers on this machine's cores: one thread each, or they thrash
        **s3_env(store.endpoint),
    )
    models = f"{TINY},{TINY_SD2}"
    logs = [tmp_path / "a1.log", tmp_path / "b.log", tmp_path / "a2.log"]
    workers = [
        WorkerProcess(env, models, logs[0], name="a@chaos"),
        WorkerProcess(env, models, logs[1], name="b@chaos"),
    ]
    try:
        for worker in workers:
            worker.start()
        settings = Settings(
            home=home,
            broker_url=sentinel_redis.url,
            storage_url=f"s3://{BUCKET}/out",
            s3_endpoint_url=store.endpoint,
            webhook_secret=SECRET,
            webhook_allow_private=True,
        )
        with Client(settings) as client:
            handles = client.submit_many(
                [
                    {"model": (TINY, TINY_SD2)[i % 2], "prompt": f"chaos {i}", "seed": i, "steps": 8}
                    | {"webhook_url": receiver.url}
                    for i in range(JOBS)
                ],
                batch_webhook_url=receiver.url,
            )
            ids = [h.job_id for h in handles]

            def ended() -> int:
                try:
                    counts = client.jobs.count_by_status()
                except redis.RedisError:  # the test's own reads, mid-failover: look again
                    return -1
                return sum(counts[s] for s in JobStatus if s.final)

            # 1. kill -9 a worker mid-job, and start it again (a new instance, the same name)
            wait_until(lambda: ended() >= 30, timeout=300, interval=0.2, what="30 jobs done")
            wait_until(
                lambda: any(r.worker == "a@chaos" for r in client.jobs.page(status=JobStatus.running)[0]),
                timeout=60,
                what="worker a running a job",
            )
            workers[0].kill()
            workers.append(WorkerProcess(env, models, logs[2], name="a@chaos").start())

            # 2. the Redis primary crashes and a sentinel promotes the replica
            wait_until(lambda: ended() >= 100, timeout=300, interval=0.2, what="100 jobs done")
            sentinel_redis.crash_primary(caught_up=True)

            # 3. the object store is unreachable for 20 s
            wait_until(lambda: ended() >= 170, timeout=300, interval=0.2, what="170 jobs done")
            store.down()
            time.sleep(STORE_OUTAGE)
            store.up()

            records = client.wait(ids, timeout=600)
            finished = totals(client.redis).get("finished", {})
            # each end's webhook event (written in the end's own step) and the batch's, delivered
            # by the workers' services loops: at least once each, receivers dedupe by webhook-id
            events = {event_id(i) for i in ids} | {batch_event_id(handles[0].batch_id)}
            wait_until(
                lambda: events <= {d["id"] for d in receiver.deliveries},
                timeout=300,
                what="every job's webhook event and the batch's delivered",
            )
    finally:
        for worker in workers:
            worker.kill()
        sentinel_redis.stop()
        receiver.close()

    try:
        by_id = {r.job_id: r for r in records}
        assert len(by_id) == JOBS and all(
            r.status in (JobStatus.succeeded, JobStatus.failed) for r in records
        )
        failed = [r for r in records if r.status is JobStatus.failed]
        assert all(r.error for r in failed), "a failed job says why"
        assert len(failed) <= JOBS // 10, [r.error for r in failed[:5]]

        # ended exactly once: each end is counted in the step that writes it (fleet/lifecycle.py)
        assert sum(finished.values()) == JOBS, finished
        # every image of a succeeded job is in the store once, under its own key; nothing else is
        listed = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
        keys = [
            item["Key"]
            for page in listed.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="out/images/")
            for item in page.get("Contents", [])
        ]
        assert len(keys) == len(set(keys))
        expected = {
            f"out/{image.key}" for r in records if r.status is JobStatus.succeeded for image in r.images
        }
        assert len(expected) == sum(r.job.num_images for r in records if r.status is JobStatus.succeeded)
        assert expected <= set(keys), sorted(expected - set(keys))[:5]
        stray = set(keys) - expected  # only images of a job that failed after storing some
        assert all(key.split("/")[-2] in {r.job_id for r in failed} for key in stray), sorted(stray)[:5]

        # no job ran on two workers at once, from the records: every run is kept on its job's
        # record, each closed (with its outcome) before the next one started
        for record in records:
            runs = record.runs
            assert len(runs) == record.attempts and runs, record.job_id
            assert all(r.ended_at is not None for r in runs), (record.job_id, runs)
            for earlier, later in zip(runs, runs[1:]):
                assert earlier.ended_at <= later.started_at, f"job {record.job_id} ran twice at once: {runs}"
                assert earlier.outcome in ("lost", "handed back", "queued again"), (record.job_id, runs)
            last = (runs[-1].outcome, record.status.value)
            assert last[0] == last[1] or last == ("lost", "failed"), (record.job_id, runs)
        assert any(len(r.runs) > 1 for r in records), "the killed worker's job ran again"
        assert all(d["verified"] for d in receiver.deliveries)
        ended = {d["id"]: d["body"]["type"] for d in receiver.deliveries}
        assert all(ended[event_id(r.job_id)] == f"job.{r.status.value}" for r in records)
        counts = next(
            d["body"] for d in receiver.deliveries if d["id"] == batch_event_id(handles[0].batch_id)
        )
        assert counts["data"]["counts"] == {
            s.value: n for s in JobStatus if (n := sum(r.status is s for r in records))
        }, counts
    finally:
        store.down()
