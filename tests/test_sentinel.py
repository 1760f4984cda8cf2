"""Redis that fails over: a primary, a replica and three sentinels (Debian's redis-server 7
in sentinel mode), real workers; the primary is killed while jobs are queued and running."""

from __future__ import annotations

import subprocess
import time

import pytest

from lorafleet.common.broker import Broker
from lorafleet.common.errors import ConfigError
from lorafleet.common.jobs import JobStatus
from lorafleet.common.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import (
    RedisProcess,
    WorkerProcess,
    debian_redis_server,
    free_port,
    lorafleet_env,
    wait_until,
)

pytestmark = pytest.mark.slow

MASTER = "lorafleet-main"


class SentinelProcess:
    """``redis-server CONF --sentinel`` watching the primary on ``primary_port``."""

    def __init__(self, folder, primary_port: int) -> None:
        self.port = free_port()
        self.folder = folder
        self.primary_port = primary_port
        self.process: subprocess.Popen | None = None

    def start(self) -> SentinelProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        self.process = subprocess.Popen(
            [debian_redis_server(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _reachable(url: str) -> bool:
    try:
        return bool(Broker(url).client().ping())
    except Exception:  # noqa: BLE001  (no master known yet)
        return False


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
    primary = RedisProcess(tmp_path / "primary", extra=["--protected-mode", "no"]).start()
    replica = RedisProcess(
        tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(primary.port), "--protected-mode", "no"]
    ).start()
    sentinels = [SentinelProcess(tmp_path / f"sentinel-{i}", primary.port).start() for i in range(3)]
    url = f"sentinel://{','.join(f'127.0.0.1:{s.port}' for s in sentinels)}/{MASTER}/0"
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, url, LORAFLEET_WORKER_LOST_AFTER="20")
    workers = []
    try:
        wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", timeout=30)
        wait_until(lambda: _reachable(url), timeout=30, what="the sentinels to know the primary")
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
            time.sleep(1)  # let the replica take in the last writes (replication is asynchronous)
            primary.process.kill()  # no shutdown: the primary is gone as in a crash
            primary.process.wait()
            wait_until(
                lambda: replica.client().info("replication")["role"] == "master",
                timeout=60,
                what="the failover",
            )
            records = client.wait([h.job_id for h in handles], timeout=300)
        assert [r.status for r in records] == [JobStatus.succeeded] * 6, [r.error for r in records]
        logs = "".join(w.log.read_text() for w in workers)
        for handle in handles:
            assert logs.count(f"job {handle.job_id} succeeded") == 1, handle.job_id
    finally:
        for worker in workers:
            worker.kill()
        for sentinel in sentinels:
            sentinel.stop()
        replica.stop()
        primary.stop()
