"""Webhook events and ended batches are handled under leases: however many processes run the
services loop, an event is POSTed by one holder at a time and its attempts are all recorded,
a holder that outlived its lease writes nothing over the next holder's outcome, and an ended
batch is handled by one process at a time. Real Redis, a real HTTP receiver on loopback; two
senders in two threads stand for two processes, with a lease of a second or two and a
receiver (or a batch consumer) a fraction of that slow."""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from lorafleet.common.fleet.store import JobStore
from lorafleet.common.infra.storage import LocalStorage
from lorafleet.common.schema import keys
from lorafleet.common.services import batches, webhooks
from lorafleet.common.services.batches import BatchEnds
from lorafleet.common.services.webhooks import WebhookSender, queue_event, read_event
from tests.helpers import free_port, wait_until

SECRET = "whsec_" + base64.b64encode(b"a test secret of thirty-two bytes").decode()
LEASE = 1.5
"""Seconds of lease in these tests: five deliveries (or batch ends) of SLOW seconds each fit
in one, so a pass that took more than five at once would outlive its lease mid-way."""
SLOW = 0.3
"""Seconds the slow receiver (or batch consumer) takes over each one."""


class SlowReceiver:
    """An HTTP receiver on loopback that answers every POST after ``delay`` seconds (the first
    one after ``first_delay`` seconds, with ``first_status``), and notes each delivery's
    webhook-id, and whether another delivery of the same id was in flight at the same time."""

    def __init__(self, delay: float, first_delay: float | None = None, first_status: int = 204) -> None:
        self.deliveries: Counter[str] = Counter()
        self.overlapping: list[str] = []
        self.in_flight: Counter[str] = Counter()
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                id_ = self.headers["webhook-id"]
                with lock:
                    first = not receiver.deliveries
                    receiver.deliveries[id_] += 1
                    receiver.in_flight[id_] += 1
                    if receiver.in_flight[id_] > 1:
                        receiver.overlapping.append(id_)
                time.sleep(first_delay if first and first_delay is not None else delay)
                with lock:
                    receiver.in_flight[id_] -= 1
                self.send_response(first_status if first else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def client(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def receiver():
    """Makes slow receivers, and closes them after the test."""
    made: list[SlowReceiver] = []

    def make(**options) -> SlowReceiver:
        made.append(SlowReceiver(**options))
        return made[-1]

    yield make
    for r in made:
        r.close()


def sender(client: redis.Redis) -> WebhookSender:
    """A sender as one process's services loop has it (private addresses allowed here)."""
    return WebhookSender(client, SECRET, allow_private=True, max_seconds=3600)


def until_empty(due: str, client: redis.Redis, one_pass) -> threading.Thread:
    """A thread that runs ``one_pass`` again and again, as a services loop does, until the
    due set ``due`` is empty (or a minute has passed)."""

    def loop() -> None:
        deadline = time.monotonic() + 60
        while client.zcard(due) and time.monotonic() < deadline:
            one_pass()
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_two_processes_never_post_one_event_at_once_and_record_every_attempt(client, receiver, monkeypatch):
    monkeypatch.setattr(webhooks, "LEASE_SECONDS", LEASE)
    slow = receiver(delay=SLOW)
    ids = [f"msg_lease{i:02d}" for i in range(12)]  # one order: by id
    for id_ in ids:
        queue_event(client, id_, slow.url, {"type": "job.succeeded"})
    passes = [until_empty(keys.WEBHOOKS_DUE, client, sender(client).deliver_due) for _ in range(2)]
    for thread in passes:
        thread.join()
    events = {id_: read_event(client, id_.removeprefix("msg_")) for id_ in ids}
    assert slow.overlapping == []  # no event was POSTed by two holders at once
    assert slow.deliveries == Counter(dict.fromkeys(ids, 1))  # nor by two, one after the other
    assert {i: e["state"] for i, e in events.items()} == dict.fromkeys(ids, "delivered")
    assert {i: len(e["attempts"]) for i, e in events.items()} == {i: slow.deliveries[i] for i in ids}


def test_a_delivery_that_outlived_its_lease_leaves_the_next_holders_outcome_alone(
    client, receiver, monkeypatch, caplog
):
    """The first holder's receiver answers 500 only after its lease has run out; meanwhile a
    second process took the event over and delivered it. The first holder's late 500 must not
    put the delivered event back to pending (nor drop the attempt that delivered it)."""
    monkeypatch.setattr(webhooks, "LEASE_SECONDS", 0.5)
    slow = receiver(delay=0.0, first_delay=1.5, first_status=500)
    queue_event(client, "msg_overrun", slow.url, {"type": "job.succeeded"})
    first = threading.Thread(target=sender(client).deliver_due, daemon=True)
    with caplog.at_level(logging.WARNING, logger=webhooks.__name__):
        first.start()
        wait_until(lambda: slow.deliveries, timeout=30, what="the first holder's POST")  # it holds it
        second = sender(client)
        deadline = time.monotonic() + 30
        while (read_event(client, "overrun") or {}).get("state") != "delivered":
            assert time.monotonic() < deadline, "the second process never delivered the event"
            second.deliver_due()
            time.sleep(0.05)
        first.join()
    event = read_event(client, "overrun")
    assert sum(slow.deliveries.values()) == 2  # at least once: both holders POSTed it
    assert event["state"] == "delivered" and [a["status"] for a in event["attempts"]] == [204]
    assert client.zscore(keys.WEBHOOKS_DUE, "msg_overrun") is None  # not due again
    assert any("msg_overrun" in r.getMessage() and "lease" in r.getMessage() for r in caplog.records)


def test_two_processes_never_handle_one_ended_batch_at_once(client, tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "LEASE_SECONDS", LEASE)
    ids = [f"lease{i:02d}" for i in range(10)]
    client.zadd(keys.BATCHES_ENDED, dict.fromkeys(ids, 0))
    handled: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()
    overlapping: list[str] = []
    lock = threading.Lock()

    def process() -> BatchEnds:
        ends = BatchEnds(JobStore(client, retention=3600), LocalStorage(tmp_path))

        def handle(batch_id: str, keep) -> None:  # a consumer as slow as a large sweep's grid
            with lock:
                handled[batch_id] += 1
                in_flight[batch_id] += 1
                if in_flight[batch_id] > 1:
                    overlapping.append(batch_id)
            time.sleep(SLOW)
            BatchEnds.handle(ends, batch_id, keep)
            with lock:
                in_flight[batch_id] -= 1

        ends.handle = handle
        return ends

    passes = [until_empty(keys.BATCHES_ENDED, client, process().handle_due) for _ in range(2)]
    for thread in passes:
        thread.join()
    assert overlapping == []
    assert handled == Counter(dict.fromkeys(ids, 1))


def test_an_answer_trickled_past_the_attempts_time_is_recorded_as_no_answer(client, monkeypatch):
    """httpx bounds each read, not the whole answer: a receiver sending a byte every 0.2 s
    would hold the attempt (and past its lease, the event) for as long as it liked."""
    monkeypatch.setattr(webhooks, "TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(webhooks, "ATTEMPT_SECONDS", 1.0)

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-length", "20")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b".")
                self.wfile.flush()
                time.sleep(0.2)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        queue_event(client, "msg_trickle", url, {"type": "job.succeeded"})
        sender(client).deliver_due()
        event = read_event(client, "trickle")
    finally:
        server.shutdown()
        server.server_close()
    assert event["state"] == "pending" and len(event["attempts"]) == 1
    assert "no whole answer within 1 s" in event["attempts"][0]["error"]


def test_a_batch_handled_for_longer_than_its_lease_keeps_it_and_is_handled_once(
    client, tmp_path, monkeypatch
):
    """A large sweep's grid draws for minutes: its handler renews the lease as it goes (the
    grid builder calls ``keep`` every few cells), so a second process never takes it over."""
    monkeypatch.setattr(batches, "LEASE_SECONDS", 1.0)
    client.zadd(keys.BATCHES_ENDED, {"long": 0})
    handled: Counter[str] = Counter()
    overlapping: list[str] = []
    lock = threading.Lock()

    def process() -> BatchEnds:
        ends = BatchEnds(JobStore(client, retention=3600), LocalStorage(tmp_path))

        def handle(batch_id: str, keep) -> None:  # 2.5 s of drawing, the lease renewed as it goes
            with lock:
                handled[batch_id] += 1
                if handled[batch_id] > 1:
                    overlapping.append(batch_id)
            for _ in range(25):
                time.sleep(0.1)
                keep()

        ends.handle = handle
        return ends

    passes = [until_empty(keys.BATCHES_ENDED, client, process().handle_due) for _ in range(2)]
    for thread in passes:
        thread.join()
    assert overlapping == [] and handled == Counter({"long": 1})
    assert client.zscore(keys.BATCHES_ENDED, "long") is None  # done, by its holder
