"""Redis that fails over: a primary, a replica and three sentinels (Debian's redis-server 7
in sentinel mode), real workers; the primary is killed while jobs are queued and running."""

from __future__ import annotations

import pytest

from lorafleet.common.infra.broker import Broker
from lorafleet.common.schema.errors import ConfigError
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import SentinelRedis, WorkerProcess, lorafleet_env, wait_until

pytestmark = pytest.mark.slow


def test_a_malformed_sentinel_url_is_refused_saying_what_is_wrong():
    with pytest.raises(ConfigError, match="MASTER_NAME"):
        Broker("sentinel://127.0.0.1:26379").sentinel  # noqa: B018
    with pytest.raises(ConfigError, match="HOST:PORT"):
        Broker("sentinel://nowhere/main").sentinel  # noqa: B018
    broker = Broker("redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26380/main/2")
    assert broker.sentinel.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (broker.sentinel.master, broker.sentinel.db, broker.sentinel.password) == ("main", 2, "p@ss")
    assert broker.celery_url == "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://:p%40ss@10.0.0.2:26380/2"
    assert "p@ss" not in broker.describe() and "p%40ss" not in broker.describe()


def test_jobs_survive_the_primary_failing_over(template_home, tmp_path):
    redis = SentinelRedis(tmp_path / "redis").start()
    url = redis.url
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, url, LORAFLEET_WORKER_LOST_AFTER="20")
    workers = []
    try:
        workers = [
            WorkerProcess(env, TINY, tmp_path / f"w{i}.log", name=f"w{i}@sentinel").start() for i in range(2)
        ]
        with Client(Settings(home=home, broker_url=url)) as client:
            handles = client.submit_many(
                [{"model": TINY, "prompt": f"failover {i}", "seed": i, "steps": 6} for i in range(6)]
            )
            wait_until(
                lambda: any(client.get(h.job_id).status is JobStatus.running for h in handles),
                timeout=60,
                what="a job running",
            )
            redis.wait_for_replica()  # it holds the writes so far (replication is asynchronous)
            redis.crash_primary()  # no shutdown: the primary is gone as in a crash
            records = client.wait([h.job_id for h in handles], timeout=300)
        assert [r.status for r in records] == [JobStatus.succeeded] * 6, [r.error for r in records]

        def logs() -> str:
            return "".join(w.log.read_text() for w in workers)

        for handle in handles:  # its log line follows its final record by a moment
            wait_until(lambda h=handle: f"job {h.job_id} succeeded" in logs(), timeout=30, what=handle.job_id)
            assert logs().count(f"job {handle.job_id} succeeded") == 1, handle.job_id
    finally:
        for worker in workers:
            worker.kill()
        redis.stop()
