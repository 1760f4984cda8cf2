"""Live events: every record change in a Redis stream, read by Client.watch and streamed by
`lorafleet serve` as server-sent events that a reconnecting client resumes with Last-Event-ID."""

from __future__ import annotations

import json
import subprocess
import threading

import httpx
import pytest

from lorafleet.common.fleet.events import tail
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.helpers import BIN, free_port, lorafleet_env, wait_until
from tests.worker.conftest import make_runner

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3, "steps": 3}


def _order(event_id: str) -> tuple[int, int]:
    """A stream id's place: ``<ms>-<seq>`` compared as numbers."""
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def _run_later(settings, job_ids):
    def run():
        runner = make_runner(settings.model_copy(update={"max_batch": 1}))
        for job_id in job_ids:
            runner.run(job_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_watch_yields_a_batchs_changes_until_every_job_has_ended(settings):
    with Client(settings) as client:
        handles = client.submit_many([JOB, JOB | {"seed": 4}])
        worker = _run_later(settings, [h.job_id for h in handles])
        events = list(client.watch(batch_id=handles[0].batch_id, timeout=120))
        worker.join(timeout=60)
    for handle in handles:
        mine = [e for e in events if e.job_id == handle.job_id]
        assert mine[0].status == "running" and mine[-1].status == "succeeded"
        assert mine[-1].step == mine[-1].total == 3
        assert [e.step for e in mine] == sorted(e.step for e in mine)  # in order
    assert [_order(e.id) for e in events] == sorted(_order(e.id) for e in events)


def test_watch_refuses_to_watch_nothing(settings):
    from lorafleet.common.schema.errors import BadArgument

    with Client(settings) as client, pytest.raises(BadArgument):
        next(client.watch())


@pytest.mark.slow
def test_the_api_streams_events_and_a_reconnect_resumes_after_the_last_one(
    settings, home, redis_url, tmp_path
):
    port = free_port()
    serve = subprocess.Popen(
        [str(BIN / "lorafleet"), "serve", "--port", str(port)],
        env=lorafleet_env(home, redis_url),
        stdout=open(tmp_path / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="lorafleet serve")
        with Client(settings) as client:
            start = tail(client.redis)  # read from here: what happens before the stream opens is kept
            handle = client.submit(JOB)
            other = client.submit(JOB | {"seed": 9})  # another batch: filtered out
            received: list[dict] = []

            def read(params, headers, until):
                with httpx.stream(
                    "GET", f"{base}/v1/events", params=params, headers=headers, timeout=60
                ) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    event: dict = {}
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            event["type"] = line[7:]
                        elif line.startswith("id: "):
                            event["id"] = line[4:]
                        elif line.startswith("data: "):
                            event["data"] = json.loads(line[6:])
                        elif line == "" and "data" in event:
                            if event["type"] == "job":
                                received.append(event)
                            else:
                                assert event == {
                                    "type": "ready",
                                    "id": headers["Last-Event-ID"],
                                    "data": {"after": headers["Last-Event-ID"]},
                                }
                            event = {}
                            if until(received):
                                return

            _run_later(settings, [handle.job_id, other.job_id]).join(timeout=120)
            read(
                {"batch": handle.batch_id},
                {"Last-Event-ID": start},
                lambda got: any(e["data"]["status"] == "running" for e in got),
            )
            assert received and {e["data"]["batch_id"] for e in received} == {handle.batch_id}
            last = received[-1]["id"]
            before = len(received)
            # the client dropped after "running"; reconnecting resumes after the last event it had
            read(
                {"batch": handle.batch_id},
                {"Last-Event-ID": last},
                lambda got: got[-1]["data"]["status"] == "succeeded",
            )
            resumed = received[before:]
            assert _order(resumed[0]["id"]) > _order(last)  # nothing it had is sent again
            assert [e["data"]["status"] for e in resumed][-1] == "succeeded"
            assert all(e["data"]["job_id"] == handle.job_id for e in resumed)
    finally:
        serve.terminate()
        serve.wait(30)
