"""A queued job's standing: its place in its model's queue (priority first, then order) and an
estimate from the model's recent throughput, in the API and in `lorafleet status`."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.fleet.positions import standing
from lorafleet.common.schema import keys
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.conftest import TINY
from tests.helpers import lorafleet_env, run_cli
from tests.worker.conftest import make_runner

JOB = {"model": TINY, "prompt": "a lighthouse"}


def test_positions_follow_the_order_celery_delivers_in(settings):
    with Client(settings) as client:
        normal = [client.submit(JOB | {"seed": s}) for s in range(3)]
        urgent = client.submit(JOB | {"priority": "high"})
        places = [standing(client.redis, client.get(h.job_id)) for h in (*normal, urgent)]
        assert [p.position for p in places] == [1, 2, 3, 0]  # the high one goes first
        assert all(p.exact and p.eta_seconds is None for p in places)  # no throughput yet
        minute = int(time.time() // 60)
        client.redis.incrby(keys.model_images_in_minute(TINY, minute), 60)  # 0.1 image/s
        assert standing(client.redis, client.get(normal[1].job_id)).eta_seconds == 30.0
        make_runner(settings.model_copy(update={"max_batch": 1})).run(urgent.job_id)
        assert standing(client.redis, client.get(urgent.job_id)) is None  # ended: no standing
        # run directly (no Celery here), its message is still in the list: until a worker takes
        # it, the normal jobs keep their places behind it
        assert standing(client.redis, client.get(normal[0].job_id)).position == 1


@pytest.mark.slow  # the `lorafleet` command as a process
def test_the_api_and_the_cli_show_a_queued_jobs_standing(settings, home, redis_url):
    with Client(settings) as client:
        client.submit(JOB)
        second = client.submit(JOB | {"seed": 2})
    with TestClient(create_app(settings)) as api:
        view = api.get(f"/v1/jobs/{second.job_id}").json()
        assert view["position"] == 1 and view["eta_seconds"] is None
        assert api.get("/v1/jobs").json()["jobs"][0]["position"] is None  # not for listings
    shown = run_cli(["status", second.job_id], lorafleet_env(home, redis_url))
    assert shown.returncode == 0 and "1 ahead" in shown.stdout, shown.stdout + shown.stderr
