"""Ownership of running jobs with real worker processes: a lost worker's job goes back to the
queue within about a minute whatever the visibility timeout, a frozen worker that comes back
is fenced out, and a redelivered message never runs a job twice at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import RedisProcess, WorkerProcess, lorafleet_env, wait_until

pytestmark = pytest.mark.slow

LONG_JOB = {"model": TINY, "prompt": "a long one", "steps": 40, "width": 192, "height": 192, "num_images": 2}


@pytest.fixture
def fleet(template_home, tmp_path):
    """A Redis, a home with a local store, and workers started on demand with extra settings."""
    redis = RedisProcess(tmp_path / "redis").start()
    home = copy_home(template_home, tmp_path / "home")
    workers: list[WorkerProcess] = []

    def start_worker(name: str, **extra: str) -> WorkerProcess:
        env = lorafleet_env(home, redis.url, **extra)
        worker = WorkerProcess(env, TINY, tmp_path / f"{name}.log", name=name).start()
        workers.append(worker)
        return worker

    with Client(Settings(home=home, broker_url=redis.url)) as client:
        yield client, start_worker, home
    for worker in workers:
        if worker.process and worker.process.poll() is None:
            os.killpg(worker.process.pid, signal.SIGCONT)
        worker.kill()
    redis.stop()


def stored(home, record) -> list[str]:
    folder = home / "outputs" / record.job.output_prefix / record.job.batch_id / record.job_id
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def sampling(client, handle):
    return wait_until(
        lambda: (r := client.get(handle.job_id)).progress.step >= 2 and r, timeout=90, what="the job sampling"
    )


def test_a_worker_killed_with_default_settings_has_its_job_rerun_within_two_minutes(fleet):
    client, start_worker, home = fleet
    workers = [start_worker("a@failover"), start_worker("b@failover")]
    handle = client.submit(LONG_JOB | {"seed": 1})
    running = sampling(client, handle)
    victim = next(w for w in workers if w.name == running.worker)
    survivor = next(w for w in workers if w is not victim)
    victim.kill()
    killed_at = time.monotonic()
    record = handle.wait(timeout=120 + 60)
    assert record.status is JobStatus.succeeded, record.error
    assert time.monotonic() - killed_at < 120 + 30  # handed back after ~30 s, not the 3600 s timeout
    assert record.worker == survivor.name and record.attempts == 2
    assert any("was lost (no heartbeat" in w for w in record.warnings)
    assert stored(home, record) == ["0.png", "1.png"]
    assert survivor.log.read_text().count(f"job {handle.job_id} started") == 1


def test_a_frozen_worker_that_comes_back_finds_its_job_taken_over_and_writes_nothing(fleet):
    client, start_worker, home = fleet
    frozen = start_worker("frozen@failover", LORAFLEET_WORKER_LOST_AFTER="8")
    handle = client.submit(LONG_JOB | {"seed": 2})
    sampling(client, handle)
    os.killpg(frozen.process.pid, signal.SIGSTOP)
    other = start_worker("other@failover", LORAFLEET_WORKER_LOST_AFTER="8")
    taken = wait_until(
        lambda: (r := client.get(handle.job_id)).worker == other.name and r.status is JobStatus.running and r,
        timeout=90,
        what="the job taken over by the other worker",
    )
    os.killpg(frozen.process.pid, signal.SIGCONT)
    wait_until(
        lambda: "no longer owns the job" in frozen.log.read_text(), timeout=60, what="the frozen run fenced"
    )
    record = handle.wait(timeout=180)
    assert record.status is JobStatus.succeeded and record.worker == other.name
    assert record.run_id == taken.run_id and record.attempts == 2
    assert record.progress.step == record.progress.total  # never set back by the old run
    assert f"job {handle.job_id} succeeded" not in frozen.log.read_text()
    assert stored(home, record) == ["0.png", "1.png"]


def test_a_job_that_outlives_the_visibility_timeout_never_runs_on_two_workers(fleet):
    client, start_worker, home = fleet
    settings = {"LORAFLEET_VISIBILITY_TIMEOUT": "10"}
    first, second = start_worker("one@failover", **settings), start_worker("two@failover", **settings)
    # 150 steps: well past the 10 s timeout on this machine, even with both images in one call
    handle = client.submit(LONG_JOB | {"seed": 3, "steps": 150})
    running = sampling(client, handle)
    record = handle.wait(timeout=300)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempts == 1 and record.worker == running.worker
    logs = first.log.read_text() + second.log.read_text()
    assert logs.count(f"job {handle.job_id} started") == 1
    assert "this second delivery is dropped" in logs, "the visibility timeout passed during the job"
