"""Webhooks with real processes: a receiver on loopback that fails the first deliveries and
checks every signature (Standard Webhooks); the outbox in Redis outlives the worker that
queued the event; a submitter cannot point a webhook into the fleet's network."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from lorafleet.common.infra import net
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.batches import BatchEnds
from lorafleet.common.services.webhooks import queue_event, read_event, webhook_sender
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.conftest import TINY
from tests.helpers import WorkerProcess, free_port, lorafleet_env, wait_until
from tests.worker.conftest import make_runner

SECRET = "whsec_" + base64.b64encode(b"a test secret of thirty-two bytes").decode()
JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3, "steps": 2}


class Receiver:
    """An HTTP receiver on loopback: answers 500 to the first ``fail`` deliveries, then 204;
    keeps every delivery with whether its signature verified."""

    def __init__(self, fail: int = 0, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.fail = fail
        self.deliveries: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                try:
                    Webhook(SECRET).verify(body, dict(self.headers))
                    verified = True
                except Exception:  # noqa: BLE001
                    verified = False
                receiver.deliveries.append(
                    {
                        "id": self.headers["webhook-id"],
                        "verified": verified,
                        "body": json.loads(body),
                        "host": self.headers["host"],
                    }
                )
                self.send_response(500 if len(receiver.deliveries) <= receiver.fail else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port or free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lorafleet"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked(settings):
    return settings.model_copy(update={"webhook_secret": SECRET, "webhook_allow_private": True})


def test_an_ended_job_is_posted_signed_and_retried_with_the_same_event_id(hooked):
    receiver = Receiver(fail=2)
    try:
        with Client(hooked) as client:
            handle = client.submit(JOB | {"webhook_url": receiver.url, "tags": {"run": "7"}})
            make_runner(hooked).run(handle.job_id)
            sender = webhook_sender(hooked, client.redis)
            for _ in range(3):  # each pass finds it due (time moved past its back-off)
                sender.deliver_due(now=time.time() + 10**6)
            event = read_event(client.redis, handle.job_id)
        assert [d["verified"] for d in receiver.deliveries] == [True, True, True]
        assert len({d["id"] for d in receiver.deliveries}) == 1  # one event, delivered at least once
        body = receiver.deliveries[-1]["body"]
        assert body["type"] == "job.succeeded" and body["data"]["job_id"] == handle.job_id
        assert body["data"]["tags"] == {"run": "7"} and body["data"]["images"][0]["uri"]
        assert event["state"] == "delivered"
        assert [a["status"] for a in event["attempts"]] == [500, 500, 204]
        with TestClient(create_app(hooked)) as api:
            shown = api.get(f"/v1/jobs/{handle.job_id}/webhook").json()
        assert shown["state"] == "delivered" and len(shown["attempts"]) == 3
    finally:
        receiver.close()


def test_a_cancelled_job_sends_its_event_once(hooked):
    receiver = Receiver()
    try:
        with Client(hooked) as client:
            handle = client.submit(JOB | {"webhook_url": receiver.url})
            client.cancel(handle.job_id)
            make_runner(hooked).run(handle.job_id)  # the worker meets the message later: no second event
            sender = webhook_sender(hooked, client.redis)
            sender.deliver_due(now=time.time() + 10**6)
            sender.deliver_due(now=time.time() + 10**6)
        assert [d["body"]["type"] for d in receiver.deliveries] == ["job.cancelled"]
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "url, update, message",
    [
        ("http://127.0.0.1:9/x", {"webhook_allow_private": False}, "not a public address"),
        ("http://10.1.2.3/x", {"webhook_allow_private": False}, "not a public address"),
        ("http://[::ffff:127.0.0.1]/x", {"webhook_allow_private": False}, "not a public address"),
        ("ftp://example.com/x", {}, "webhook_url"),
        ("http://example.com/x", {"webhook_secret": None}, "LORAFLEET_WEBHOOK_SECRET is not set"),
    ],
)
def test_a_webhook_into_the_fleets_network_or_without_a_secret_is_refused(hooked, url, update, message):
    with TestClient(create_app(hooked.model_copy(update=update))) as api:
        response = api.post(
            "/v1/jobs", json=JOB | {"webhook_url": url}, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text
        problem = response.json()["detail"][0]
        assert problem["field"] == "webhook_url" and message in json.dumps(response.json())
        assert api.get("/v1/jobs").json()["total"] == 0


def test_a_delivery_connects_to_the_address_checked_not_to_a_second_lookup(hooked, monkeypatch):
    """DNS rebinding: the delivery goes to the address its check resolved, never to what the
    name resolves to when httpx would look it up again; the name stays in the Host header.
    Here lorafleet's lookup answers 127.0.0.2 for "localhost", the system's 127.0.0.1."""
    port = free_port()
    system = Receiver(port=port)  # where a second lookup of "localhost" leads
    checked = Receiver(port=port, host="127.0.0.2")  # Linux routes all of 127/8 to loopback
    looked_up = []

    def lookup(host: str) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.2"]

    monkeypatch.setattr(net, "resolve", lookup)
    try:
        with Client(hooked) as client:
            queue_event(
                client.redis, "msg_pinned", f"http://localhost:{port}/hook", {"type": "job.succeeded"}
            )
            assert webhook_sender(hooked, client.redis).deliver_due(now=time.time() + 1) == 1
            event = read_event(client.redis, "pinned")  # the event of job "pinned"
        assert system.deliveries == []
        assert looked_up == ["localhost"]  # looked up once, though private addresses are allowed
        assert [(d["id"], d["host"], d["verified"]) for d in checked.deliveries] == [
            ("msg_pinned", f"localhost:{port}", True)
        ]
        assert event["state"] == "delivered" and [a["status"] for a in event["attempts"]] == [204]
    finally:
        system.close()
        checked.close()


@pytest.mark.slow
def test_a_pending_event_outlives_its_worker_and_is_delivered_by_the_next(template_home, redis_url, tmp_path):
    from tests.conftest import copy_home

    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(
        home, redis_url, LORAFLEET_WEBHOOK_SECRET=SECRET, LORAFLEET_WEBHOOK_ALLOW_PRIVATE="true"
    )
    port = free_port()  # nobody listens there yet: the first attempts are refused
    settings = Settings(home=home, broker_url=redis_url, webhook_secret=SECRET, webhook_allow_private=True)
    first = WorkerProcess(env, TINY, tmp_path / "first.log", name="first@hooks").start()
    second = WorkerProcess(env, TINY, tmp_path / "second.log", name="second@hooks")
    receiver = None
    try:
        with Client(settings) as client:
            handle = client.submit(JOB | {"webhook_url": f"http://127.0.0.1:{port}/hook"})
            assert handle.wait(timeout=120).status.value == "succeeded"
            wait_until(
                lambda: (e := read_event(client.redis, handle.job_id)) and e["attempts"],
                timeout=60,
                what="a first, refused delivery",
            )
            first.kill()  # the worker that queued and tried it is gone
            receiver = Receiver(port=port)
            second.start()
            wait_until(lambda: receiver.deliveries, timeout=120, what="the delivery by the next worker")
            wait_until(  # the outbox records the answer just after the receiver has it
                lambda: read_event(client.redis, handle.job_id)["state"] == "delivered", timeout=30
            )
            event = read_event(client.redis, handle.job_id)
        assert receiver.deliveries[0]["verified"] and receiver.deliveries[0]["id"] == event["id"]
        assert event["state"] == "delivered" and event["attempts"][0]["status"] is None
        assert "ConnectError" in event["attempts"][0]["error"]
    finally:
        first.kill()
        second.kill()
        if receiver is not None:
            receiver.close()


def test_a_batch_webhook_is_sent_once_when_its_last_job_ends(hooked):
    receiver = Receiver()
    try:
        with Client(hooked) as client:
            handles = client.submit_many(
                [JOB, JOB | {"seed": 4}, JOB | {"seed": 5}], batch_webhook_url=receiver.url
            )
            batch = handles[0].batch_id
            runner = make_runner(hooked.model_copy(update={"max_batch": 1}))
            sender = webhook_sender(hooked, client.redis)
            ends = BatchEnds(client.jobs, open_storage(hooked))
            runner.run(handles[0].job_id)
            client.cancel(handles[1].job_id)
            ends.handle_due()
            sender.deliver_due(now=time.time() + 10**6)
            assert receiver.deliveries == []  # one job is still queued
            runner.run(handles[1].job_id)  # meets the cancelled record: counted once, not twice
            ends.handle_due()
            sender.deliver_due(now=time.time() + 10**6)
            assert receiver.deliveries == []
            runner.run(handles[2].job_id)
            ends.handle_due()
            sender.deliver_due(now=time.time() + 10**6)
            ends.handle_due()
            sender.deliver_due(now=time.time() + 10**6)
        assert len(receiver.deliveries) == 1 and receiver.deliveries[0]["verified"]
        body = receiver.deliveries[0]["body"]
        assert body["type"] == "batch.ended" and body["data"]["batch_id"] == batch
        assert body["data"]["counts"] == {"succeeded": 2, "cancelled": 1}
        assert sorted(j["job_id"] for j in body["data"]["jobs"]) == sorted(h.job_id for h in handles)
    finally:
        receiver.close()


def test_a_batch_webhook_into_the_fleets_network_is_refused_and_queues_nothing(hooked):
    closed = hooked.model_copy(update={"webhook_allow_private": False})
    with TestClient(create_app(closed)) as api:
        response = api.post(
            "/v1/jobs",
            json=[JOB],
            params={"batch_webhook_url": "http://127.0.0.1:9/x"},
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 422 and response.json()["detail"][0]["field"] == "batch_webhook_url"
        assert api.get("/v1/jobs").json()["total"] == 0


@pytest.mark.slow
def test_the_api_restarted_while_an_event_is_pending_delivers_it(template_home, redis_url, tmp_path):
    import subprocess

    import httpx

    from tests.conftest import copy_home
    from tests.helpers import BIN

    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(
        home, redis_url, LORAFLEET_WEBHOOK_SECRET=SECRET, LORAFLEET_WEBHOOK_ALLOW_PRIVATE="true"
    )
    settings = Settings(home=home, broker_url=redis_url, webhook_secret=SECRET, webhook_allow_private=True)
    port = free_port()  # the receiver is down at first
    with Client(settings) as client:
        handle = client.submit(JOB | {"webhook_url": f"http://127.0.0.1:{port}/hook"})
        make_runner(settings).run(handle.job_id)  # ended: its event waits in the outbox

        def serve():
            api_port = free_port()
            process = subprocess.Popen(
                [str(BIN / "lorafleet"), "serve", "--port", str(api_port)],
                env=env,
                stdout=open(tmp_path / f"serve-{api_port}.log", "wb"),
                stderr=subprocess.STDOUT,
            )

            def up() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{api_port}/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(up, timeout=60, what="lorafleet serve")
            return process

        first = serve()
        try:
            wait_until(
                lambda: read_event(client.redis, handle.job_id)["attempts"], timeout=60, what="an attempt"
            )
        finally:
            first.kill()  # the API goes away with the event still pending
            first.wait()
        assert read_event(client.redis, handle.job_id)["state"] == "pending"
        receiver = Receiver(port=port)
        second = serve()
        try:
            wait_until(lambda: receiver.deliveries, timeout=90, what="the delivery by the restarted API")
            wait_until(lambda: read_event(client.redis, handle.job_id)["state"] == "delivered", timeout=30)
        finally:
            second.terminate()
            second.wait(30)
            receiver.close()
        assert (
            receiver.deliveries[0]["verified"]
            and read_event(client.redis, handle.job_id)["state"] == "delivered"
        )
