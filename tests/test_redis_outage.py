"""A Redis outage with real processes: a running job keeps sampling (its progress waits),
finishes once Redis is back, and no worker fails its liveness check meanwhile."""

from __future__ import annotations

import time

import pytest

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import RedisProcess, TcpProxy, WorkerProcess, lorafleet_env, run_cli, wait_until

pytestmark = pytest.mark.slow


def test_a_redis_outage_pauses_progress_and_the_job_ends_once_when_it_returns(template_home, tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    proxy = TcpProxy(redis.port).up()
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, f"redis://127.0.0.1:{proxy.port}/0")
    worker = WorkerProcess(env, TINY, tmp_path / "worker.log", name="patient@outage").start()
    try:
        with Client(Settings(home=home, broker_url=redis.url)) as client:
            handle = client.submit(
                {"model": TINY, "prompt": "through an outage", "steps": 60, "width": 192, "height": 192}
            )
            wait_until(lambda: client.get(handle.job_id).progress.step >= 2, timeout=90, what="sampling")
            proxy.down()
            wait_until(
                lambda: "progress not written" in worker.log.read_text(), timeout=60, what="a missed write"
            )
            check = run_cli(["workers", "check", "--name", "patient@outage"], env)
            assert check.returncode == 0 and "Redis unreachable" in check.stdout, check.stdout + check.stderr
            stalled = client.get(handle.job_id).progress.step
            time.sleep(3)  # the outage itself: Redis stays away a while, the job sampling on
            assert client.get(handle.job_id).status is JobStatus.running
            proxy.up()
            record = handle.wait(timeout=300)
        assert record.status is JobStatus.succeeded, record.error
        assert record.attempts == 1 and record.progress.step == record.progress.total > stalled
        assert worker.process.poll() is None, "the worker lives on"
        assert worker.log.read_text().count(f"job {handle.job_id} started") == 1
    finally:
        worker.kill()
        proxy.down()
        redis.stop()
