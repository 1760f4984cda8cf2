"""Idempotent submits against a real Redis: a retried request gets the jobs of its first try,
never a second batch; the same key with another body is a 409 naming the conflict."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import DuplicateRequest
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from lorafleet.producer.idempotency import IdempotencyKeys, fingerprint
from tests.conftest import TINY
from tests.producer.test_client import queued_messages

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3}
JSON_CALL = {"Content-Type": "application/json"}


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def test_a_retried_sdk_submit_gets_the_first_jobs_and_queues_nothing_more(settings):
    with Client(settings) as client:
        first = client.submit_many([JOB, JOB | {"seed": 4}], idempotency_key="run-42")
        again = client.submit_many([JOB, JOB | {"seed": 4}], idempotency_key="run-42")
        assert [h.job_id for h in again] == [h.job_id for h in first] and all(h.replayed for h in again)
        assert not any(h.replayed for h in first)
        assert client.jobs.page()[1] == 2 and len(queued_messages(client)) == 2
        with pytest.raises(DuplicateRequest, match="used with another request"):
            client.submit_many([JOB | {"seed": 5}], idempotency_key="run-42")
        other = client.submit_many([JOB], idempotency_key="run-43")  # another key: a new job
        assert other[0].job_id not in {h.job_id for h in first}
        ttl = client.redis.ttl(next(iter(client.redis.scan_iter(keys.idempotency("-", "*")))))
        assert 0 < ttl <= settings.idempotency_seconds


def test_the_api_answers_a_retry_with_200_and_another_body_with_409(api):
    body = [JOB, JOB | {"seed": 9}]
    created = api.post("/v1/jobs", json=body, headers=JSON_CALL | {"Idempotency-Key": "abc-1"})
    assert created.status_code == 201
    retried = api.post("/v1/jobs", json=body, headers=JSON_CALL | {"Idempotency-Key": "abc-1"})
    assert retried.status_code == 200 and retried.json() == created.json()
    conflict = api.post("/v1/jobs", json=JOB, headers=JSON_CALL | {"Idempotency-Key": "abc-1"})
    assert conflict.status_code == 409 and "another request" in conflict.json()["detail"]
    other_batch = api.post(
        "/v1/jobs", json=body, params={"batch_id": "b-2"}, headers=JSON_CALL | {"Idempotency-Key": "abc-1"}
    )
    assert other_batch.status_code == 409  # the batch_id is part of the request
    assert api.get("/v1/jobs").json()["total"] == 2


def test_a_refused_request_leaves_its_key_free_for_the_corrected_one(api):
    headers = JSON_CALL | {"Idempotency-Key": "fix-me"}
    refused = api.post("/v1/jobs", json=JOB | {"steps": 0}, headers=headers)
    assert refused.status_code == 422 and api.get("/v1/jobs").json()["total"] == 0
    assert api.post("/v1/jobs", json=JOB | {"steps": 10}, headers=headers).status_code == 201


def test_a_key_whose_first_request_is_still_in_progress_is_a_409(api, settings):
    with Client(settings) as client:
        request = {"jobs": [JOB], "batch_id": None, "require_worker": False, "batch_webhook_url": None}
        assert IdempotencyKeys(client.redis, 60).claim("slow-1", None, fingerprint(request)) is None
    response = api.post("/v1/jobs", json=JOB, headers=JSON_CALL | {"Idempotency-Key": "slow-1"})
    assert response.status_code == 409 and "still being handled" in response.json()["detail"]


def test_a_bad_key_is_refused_naming_the_header(api):
    response = api.post("/v1/jobs", json=JOB, headers=JSON_CALL | {"Idempotency-Key": "has space"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "Idempotency-Key"


def test_keys_belong_to_their_tenant(settings):
    tenanted = settings.model_copy(update={"api_tokens": "acme:t1,globex:t2"})
    with TestClient(create_app(tenanted)) as api:
        for token in ("t1", "t2"):
            headers = JSON_CALL | {"Idempotency-Key": "same", "Authorization": f"Bearer {token}"}
            assert api.post("/v1/jobs", json=JOB, headers=headers).status_code == 201
        # the same key is no conflict across tenants: each created its own job
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer t1"}).json()["total"] == 1
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer t2"}).json()["total"] == 1


def test_a_retried_sweep_without_a_batch_id_gets_the_first_answer(api, settings):
    """The batch id a sweep makes up is not part of the request: the retry is the same request."""
    spec = {"base": JOB, "x": {"name": "seed", "values": [1, 2]}}
    headers = JSON_CALL | {"Idempotency-Key": "sweep-1"}
    created = api.post("/v1/sweeps", json=spec, headers=headers)
    assert created.status_code == 201
    retried = api.post("/v1/sweeps", json=spec, headers=headers)
    assert retried.status_code == 200 and retried.json() == created.json()
    assert api.get("/v1/jobs").json()["total"] == 2
    with Client(settings) as client:  # the retry saved no layout of its own
        layouts = list(client.redis.scan_iter(keys.sweep("*")))
        assert layouts == [keys.sweep(created.json()["batch_id"]).encode()]
    other = api.post("/v1/sweeps", json=spec | {"x": {"name": "seed", "values": [3]}}, headers=headers)
    assert other.status_code == 409 and "another request" in other.json()["detail"]
