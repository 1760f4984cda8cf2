"""One worker per device: `lorafleet worker --devices cpu,cpu` starts two named workers,
starts again the one that dies, and on SIGTERM drains both (each finishes its job)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from lorafleet.worker.supervisor import child_name, parse_devices
from tests.conftest import TINY
from tests.helpers import BIN, lorafleet_env, wait_until

pytestmark = pytest.mark.slow


def _beats(client) -> dict[str, object]:
    return {w.name: w for w in WorkerRegistry(client.redis).all() if w.liveness == "alive"}


def test_two_cpu_workers_are_started_restarted_and_drained(home, redis_url, tmp_path):
    env = lorafleet_env(home, redis_url, LORAFLEET_WORKER_LOST_AFTER="10")
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(
            [
                str(BIN / "lorafleet"),
                "worker",
                "--models",
                TINY,
                "--devices",
                "cpu,cpu",
                "--name",
                "pair@test",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    names = {"pair-0@test", "pair-1@test"}
    try:
        with Client(Settings(home=home, broker_url=redis_url)) as client:
            wait_until(lambda: names <= set(_beats(client)), timeout=120, what=f"two workers ({log})")
            first = _beats(client)
            assert {first[n].device.split(" ")[0] for n in names} == {"cpu"}
            assert first["pair-0@test"].pid != first["pair-1@test"].pid

            os.kill(first["pair-0@test"].pid, signal.SIGKILL)  # a child dies: it is started again
            wait_until(
                lambda: (
                    (b := _beats(client).get("pair-0@test")) is not None
                    and b.instance != first["pair-0@test"].instance
                ),
                timeout=120,
                what="the dead worker started again",
            )
            handles = client.submit_many(
                [{"model": TINY, "prompt": f"pair {i}", "seed": i, "steps": 2} for i in range(6)]
            )
            records = client.wait([h.job_id for h in handles], timeout=180)
            assert [r.status for r in records] == [JobStatus.succeeded] * 6

            slow = client.submit(
                {"model": TINY, "prompt": "drained", "steps": 150, "width": 192, "height": 192}
            )
            wait_until(lambda: client.get(slow.job_id).progress.step >= 2, timeout=120, what="a running job")
            supervisor.send_signal(signal.SIGTERM)  # drain: the running job finishes first
            assert supervisor.wait(timeout=240) == 0
            record = client.get(slow.job_id)
            assert record.status is JobStatus.succeeded and record.attempts == 1, record.error
        text = log.read_text()
        assert "exited with -9" in text and "draining 2 workers" in text
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()


def test_devices_are_checked_and_children_named():
    assert parse_devices("cpu, cuda:1,cuda") == ["cpu", "cuda:1", "cuda"]
    assert child_name("gpu-box@host-a", 3) == "gpu-box-3@host-a"
    from lorafleet.common.schema.errors import BadArgument

    for bad in ("tpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(BadArgument) as caught:
            parse_devices(bad)
        assert caught.value.problems[0][0] == "--devices"
