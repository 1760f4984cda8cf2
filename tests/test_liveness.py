"""A worker's liveness: judged on Redis's clock, and never delayed by slow upkeep or services."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest
import redis

from lorafleet.common.fleet.workers import FORGET_AFTER, STALE_AFTER, WorkerBeat, WorkerRegistry
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema import keys
from lorafleet.common.services.loop import Background
from lorafleet.producer import Client
from lorafleet.worker.heartbeat import Heartbeat
from tests.conftest import TINY
from tests.helpers import free_port
from tests.test_webhooks import SECRET
from tests.worker.conftest import make_runner

SLOW_RECEIVERS = 20
ANSWER_AFTER = 8.0
"""Seconds each slow receiver takes to answer a delivery."""


def _beat(name: str, instance: str, last_seen: float) -> WorkerBeat:
    return WorkerBeat(
        name=name,
        instance=instance,
        host="h",
        pid=1,
        version="t",
        device="cpu",
        started_at=0,
        last_seen=last_seen,
    )


def test_a_worker_is_judged_on_redis_clock_never_on_a_machines_clock(settings):
    with Client(settings) as client:
        registry = WorkerRegistry(client.redis)
        now = time.time()
        registry.beat(_beat("behind@a", "i1", now - 5 * 3600))  # its machine's clock is 5 h slow
        registry.beat(_beat("ahead@b", "i2", now + 3600))  # its machine's clock is an hour fast ...
        # ... and its last beat reached Redis two minutes ago
        client.redis.pexpire(keys.worker_alive("ahead@b"), int((FORGET_AFTER - 120) * 1000))
        views = {v.name: v.liveness for v in registry.all()}
        assert views == {"behind@a": "alive", "ahead@b": "gone"}
        assert registry.owner_alive("behind@a", "i1", 10)
        assert not registry.owner_alive("ahead@b", "i2", 10)
        assert not registry.owner_alive("behind@a", "another instance", 10)


class _SlowReceiver:
    """An HTTP receiver on loopback that answers every delivery after ANSWER_AFTER seconds."""

    def __init__(self) -> None:
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                receiver.requests += 1
                self.rfile.read(int(self.headers["content-length"]))
                time.sleep(ANSWER_AFTER)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{n}"


@pytest.mark.slow  # twenty real receivers, each answering after ANSWER_AFTER seconds: 20 s of waiting
def test_twenty_slow_webhook_receivers_never_delay_a_heartbeat(settings):
    hooked = settings.model_copy(
        update={"webhook_secret": SECRET, "webhook_allow_private": True, "worker_lost_after": STALE_AFTER}
    )
    receiver = _SlowReceiver()
    runner = make_runner(hooked)
    with Client(hooked) as client:
        for n in range(SLOW_RECEIVERS):  # 20 ended jobs, each with its webhook event due now
            handle = client.submit({"model": TINY, "prompt": f"slow {n}", "webhook_url": receiver.url(n)})
            client.cancel(handle.job_id)
        registry = WorkerRegistry(client.redis)
        heartbeat = Heartbeat(
            registry,
            "w@slow",
            [TINY],
            [keys.queue(TINY)],
            runner,
            runner.pipelines,
            runner.loras,
            interval=0.5,
        )
        background = Background(hooked, runner.store, client.celery, open_storage(hooked))
        heartbeat.start()
        background.start()
        try:
            ages, until = [], time.monotonic() + 2 * ANSWER_AFTER
            while time.monotonic() < until:
                ages.extend(v.age for v in registry.all() if v.name == "w@slow")
                time.sleep(0.5)
            assert receiver.requests >= 1, "the deliveries never started: nothing slow happened"
            assert max(ages) < STALE_AFTER / 2, f"the heartbeat fell behind: {max(ages):.1f} s"
            assert registry.owner_alive("w@slow", runner.instance, hooked.worker_lost_after)
        finally:
            background.stop()
            heartbeat.stop()
            receiver.server.shutdown()


def test_a_tests_runner_stays_alive_while_its_test_runs(settings):
    """make_runner's runner beats like a worker's: an API's upkeep in the same test never hands
    its jobs back however long a loaded machine takes (one beat at its start went stale)."""
    lost_after = 3.0
    runner = make_runner(settings.model_copy(update={"worker_lost_after": lost_after}))
    registry = WorkerRegistry(redis.Redis.from_url(settings.broker_url))
    time.sleep(lost_after + 1.5)
    assert registry.owner_alive(runner.worker_name, runner.instance, lost_after)
