"""The API against a hostile client: body sizes, content types, Host and Origin."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.schema import keys
from lorafleet.producer.api import create_app
from tests.conftest import TINY

JOB = {"model": TINY, "prompt": "a lighthouse"}
JSON_CALL = {"Content-Type": "application/json"}


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def nothing_queued(api) -> bool:
    return api.app.state.client.redis.zcard(keys.ALL_JOBS) == 0


def test_a_body_over_the_limit_is_refused_before_it_is_read(settings):
    small = settings.model_copy(update={"api_max_body_mb": 0.001})  # about 1 KB
    with TestClient(create_app(small)) as api:
        response = api.post("/v1/jobs", content=json.dumps(JOB | {"prompt": "x" * 2000}), headers=JSON_CALL)
        assert response.status_code == 413 and "at most 1048 are accepted" in response.json()["detail"]
        assert nothing_queued(api)
        assert api.post("/v1/jobs", json=JOB).status_code == 201


def test_the_login_form_reads_at_most_4_kib_unauthenticated(settings):
    guarded = settings.model_copy(update={"api_tokens": "secret"})
    with TestClient(create_app(guarded)) as api:
        response = api.post(
            "/login",
            content=b"token=" + b"x" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 413
        assert api.post("/login", data={"token": "wrong"}).status_code == 401


def test_a_body_without_a_length_is_refused(api):
    response = api.post("/v1/jobs", content=iter([json.dumps(JOB).encode()]), headers=JSON_CALL)
    assert response.status_code == 411
    assert nothing_queued(api)


@pytest.mark.parametrize(
    "call",
    [
        lambda api: api.post("/v1/jobs", content=json.dumps(JOB), headers={"Content-Type": "text/plain"}),
        lambda api: api.post("/v1/jobs", data={"model": TINY, "prompt": "x"}),
        lambda api: api.delete("/v1/jobs/abc"),
        lambda api: api.post("/v1/jobs/abc/retry"),
    ],
    ids=["text/plain", "form", "bare DELETE", "bare POST"],
)
def test_calls_that_change_state_must_say_json(api, call):
    response = call(api)
    assert response.status_code == 415 and "application/json" in response.json()["detail"]
    assert nothing_queued(api)


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"Host": "evil.example"}, 403),
        ({"Host": "localhost:8750"}, 200),
        ({"Host": "127.0.0.1:8750"}, 200),
        ({"Host": "[::1]:8750"}, 200),
        ({"Host": "127.0.0.1:8750", "Origin": "http://evil.example"}, 403),
        ({"Host": "127.0.0.1:8750", "Origin": "http://127.0.0.1:8750"}, 200),
    ],
)
def test_without_tokens_only_this_machines_names_are_served(api, headers, status):
    assert api.get("/v1/summary", headers=headers).status_code == status


def test_a_rebound_name_cannot_submit(api):
    response = api.post("/v1/jobs", json=JOB, headers={"Host": "attacker.example:8750"})
    assert response.status_code == 403 and nothing_queued(api)


def test_with_tokens_the_host_is_not_checked(settings):
    guarded = settings.model_copy(update={"api_tokens": "secret", "api_allowed_hosts": ""})
    with TestClient(create_app(guarded)) as api:
        response = api.get(
            "/v1/summary", headers={"Host": "fleet.example.com", "Authorization": "Bearer secret"}
        )
        assert response.status_code == 200
