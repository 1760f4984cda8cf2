"""Bounded growth: caps per submission and per model queue, and a full Redis, refused clearly
with nothing queued."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected, QueueFull
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.conftest import TINY
from tests.helpers import RedisProcess

JOB = {"model": TINY, "prompt": "a lighthouse"}


def test_a_submission_over_the_cap_is_refused_saying_the_count(settings):
    with Client(settings.model_copy(update={"max_jobs_per_submit": 2})) as client:
        with pytest.raises(JobRejected, match="3 jobs in one submission") as caught:
            client.submit_many([JOB] * 3)
        assert caught.value.field == "jobs" and client.redis.zcard(keys.ALL_JOBS) == 0
        assert len(client.submit_many([JOB] * 2)) == 2


def test_a_full_model_queue_refuses_more_with_a_429(settings):
    capped = settings.model_copy(update={"max_queued_per_model": 3})
    with Client(capped) as client:
        client.submit_many([JOB] * 2)
        with pytest.raises(QueueFull, match="cap of 3"):
            client.submit_many([JOB] * 2)
        assert client.redis.zcard(keys.ALL_JOBS) == 2
    with TestClient(create_app(capped)) as api:
        assert api.post("/v1/jobs", json=JOB).status_code == 201
        refused = api.post("/v1/jobs", json=JOB)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "LORAFLEET_MAX_QUEUED_PER_MODEL" in refused.json()["detail"]


def test_a_full_redis_is_a_clear_refusal_and_queues_nothing(home, tmp_path):
    redis = RedisProcess(
        tmp_path / "small-redis", extra=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    ).start()
    try:
        settings = Settings(home=home, broker_url=redis.url, storage_url=str(tmp_path / "out"))
        with Client(settings) as client:
            filler = "x" * 100_000
            index = 0
            try:
                while True:
                    client.redis.set(f"filler:{index}", filler)
                    index += 1
            except Exception:  # noqa: BLE001  (OOM reached: Redis refuses writes now)
                pass
            with pytest.raises(QueueFull, match="Redis is full"):
                client.submit(JOB)
            assert client.redis.zcard(keys.ALL_JOBS) == 0
    finally:
        redis.stop()
