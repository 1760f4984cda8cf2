"""Live events: every record change in a Redis stream, read by Client.watch and streamed by
`lorafleet serve` as server-sent events that a reconnecting client resumes with Last-Event-ID;
open streams hold no thread of the API's threadpool, so the rest of the API answers beside them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import anyio.to_thread
import httpx
import pytest
import uvicorn

from lorafleet.common.fleet.events import BLOCK_SECONDS, tail
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from lorafleet.producer.auth import COOKIE, open_session
from tests.conftest import TINY
from tests.helpers import BIN, free_port, lorafleet_env, wait_until
from tests.worker.conftest import make_runner

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3, "steps": 3}
STREAMS = 48
"""More event streams than the API's threadpool has threads (anyio's default limiter: 40)."""
ANSWER_SECONDS = 10.0
"""A bound on an answer beside open streams generous enough for a loaded test machine."""


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


@contextmanager
def _serving(settings) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """The app on a real uvicorn in a thread of this process: its URL, and its event loop (to
    read the threadpool's limiter where the app's routes borrow from it)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve()

    # asyncio.run: at the end, what the app left running (sse-starlette's watcher) is cancelled
    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=60, what="uvicorn")
        yield f"http://127.0.0.1:{port}", loops[0]
    finally:
        server.should_exit = True
        thread.join(30)


async def _threads_borrowed(loop: asyncio.AbstractEventLoop) -> int:
    """How many threads of the server's threadpool are in use right now."""

    async def borrowed() -> int:
        return anyio.to_thread.current_default_thread_limiter().borrowed_tokens

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(borrowed(), loop))


async def _next_event(lines) -> str:
    """The type of the next event on an open stream (``event: TYPE``)."""
    async for line in lines:
        if line.startswith("event: "):
            return line[7:]
    raise AssertionError("the stream ended")


@pytest.mark.parametrize("token", [None, "t1"], ids=["open", "behind-tokens"])
def test_open_event_streams_hold_no_threadpool_thread_and_the_api_answers_beside_them(settings, token):
    served = settings.model_copy(update={"api_tokens": token}) if token else settings
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with _serving(served) as (base, loop), Client(settings) as client:

        async def main() -> None:
            limits = httpx.Limits(max_connections=STREAMS + 8)
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=headers) as http:
                async with AsyncExitStack() as streams:
                    readers = []
                    for _ in range(STREAMS):
                        response = await streams.enter_async_context(http.stream("GET", "/v1/events"))
                        assert response.status_code == 200
                        readers.append(response.aiter_lines())
                        assert await _next_event(readers[-1]) == "ready"
                    # every stream is waiting for events; watch a full read's wait and more
                    borrowed = []
                    for _ in range(int(2 * BLOCK_SECONDS / 0.25)):
                        borrowed.append(await _threads_borrowed(loop))
                        await asyncio.sleep(0.25)
                    assert max(borrowed) == 0, f"open event streams held threadpool threads: {borrowed}"
                    started = time.monotonic()
                    summary = await http.get("/v1/summary")
                    assert summary.status_code == 200
                    assert time.monotonic() - started < ANSWER_SECONDS
                    # and the streams still carry events: every one of them sees the next job
                    await asyncio.to_thread(client.submit, JOB)
                    types = await asyncio.gather(*(_next_event(lines) for lines in readers))
                    assert types == ["job"] * STREAMS

        asyncio.run(main())


PAUSE_MS = 3000


def _beside_a_stalled_redis(settings, slow_request) -> None:
    """``slow_request(base)`` waits on Redis (paused for PAUSE_MS) in the threadpool;
    meanwhile a bearer request, which needs no Redis, is answered: the event loop is free."""
    with _serving(settings.model_copy(update={"api_tokens": "t1"})) as (base, _), Client(settings) as client:
        pauser = client.broker.client()
        pauser.ping()  # connected before the pause
        answered: dict[str, float] = {}

        def waiting_on_redis() -> None:
            slow_request(base)
            answered["slow"] = time.monotonic()

        paused_at = time.monotonic()
        pauser.client_pause(PAUSE_MS)  # every Redis client waits
        waiting = threading.Thread(target=waiting_on_redis)
        waiting.start()
        time.sleep(0.5)  # the slow request is waiting for Redis now
        bearer = httpx.get(f"{base}/openapi.json", headers={"Authorization": "Bearer t1"}, timeout=60)
        answered["bearer"] = time.monotonic()
        waiting.join(60)
    assert bearer.status_code == 200
    assert answered["bearer"] - paused_at < PAUSE_MS / 1000, "the event loop waited for Redis"
    assert answered["slow"] - paused_at >= PAUSE_MS / 1000 - 0.1  # it did wait for the pause


def test_a_session_looked_up_in_a_stalled_redis_holds_up_no_other_request(settings):
    """The token middleware reads a cookie's session from Redis in the threadpool."""
    with Client(settings) as client:
        session = open_session(client.redis, "t1")  # before the pause

    def with_cookie(base: str) -> None:
        response = httpx.get(f"{base}/v1/workers", cookies={COOKIE: session}, timeout=60)
        assert response.status_code == 200

    _beside_a_stalled_redis(settings, with_cookie)


def test_a_login_waiting_on_a_stalled_redis_holds_up_no_other_request(settings):
    """/login writes the new session to Redis in the threadpool."""

    def login(base: str) -> None:
        response = httpx.post(f"{base}/login", data={"token": "t1"}, follow_redirects=False, timeout=60)
        assert response.status_code == 303 and COOKIE in response.cookies

    _beside_a_stalled_redis(settings, login)
