"""Tokens that belong to tenants (LORAFLEET_API_TOKENS as ``tenant:token``): each tenant sees
and acts on its own jobs and batches only, within its own cap on waiting jobs; an operator's
token sees them all."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.schema.errors import ConfigError
from lorafleet.producer.api import create_app
from lorafleet.producer.auth import parse_tokens
from tests.conftest import TINY

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3}
TOKENS = "acme:acme-token, globex:globex-token, admin:boss-token, ops-token"


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


ACME, GLOBEX, ADMIN, OPS = _as("acme-token"), _as("globex-token"), _as("boss-token"), _as("ops-token")


@pytest.fixture
def api(settings):
    tenanted = settings.model_copy(update={"api_tokens": TOKENS, "max_queued_per_tenant": 3})
    with TestClient(create_app(tenanted)) as client:
        yield client


def _submit(api, headers, body, **params) -> dict:
    response = api.post("/v1/jobs", json=body, headers=headers, params=params)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_tenant_sees_and_acts_on_its_own_jobs_only(api):
    acme = _submit(api, ACME, [JOB, JOB | {"seed": 4}])
    globex = _submit(api, GLOBEX, JOB)
    acme_job, globex_job = acme["jobs"][0]["job_id"], globex["jobs"][0]["job_id"]

    listed = api.get("/v1/jobs", headers=ACME).json()
    assert listed["total"] == 2 and {j["tenant"] for j in listed["jobs"]} == {"acme"}
    assert api.get("/v1/jobs", headers=GLOBEX).json()["total"] == 1
    assert api.get("/v1/summary", headers=GLOBEX).json()["counts"]["queued"] == 1

    # another tenant's job is as absent as one that never existed: read, cancel, retry, images
    assert api.get(f"/v1/jobs/{acme_job}", headers=GLOBEX).status_code == 404
    assert api.delete(f"/v1/jobs/{acme_job}", headers=GLOBEX).status_code == 404
    assert api.post(f"/v1/jobs/{acme_job}/retry", headers=GLOBEX).status_code == 404
    assert api.get(f"/v1/jobs/{acme_job}/images/0", headers=GLOBEX).status_code == 404
    assert api.get(f"/v1/batches/{acme['batch_id']}", headers=GLOBEX).status_code == 404
    assert api.get(f"/v1/jobs/{acme_job}", headers=ACME).json()["status"] == "queued"  # untouched

    # its own: cancel and retry work, and the retry stays the tenant's
    assert api.delete(f"/v1/jobs/{globex_job}", headers=GLOBEX).json()["status"] == "cancelled"
    again = api.post(f"/v1/jobs/{globex_job}/retry", headers=GLOBEX).json()
    assert again["tenant"] == "globex"

    # operators (a bare token, or tenant admin) see every job
    for operator in (ADMIN, OPS):
        assert api.get("/v1/jobs", headers=operator).json()["total"] == 4
        assert api.get(f"/v1/jobs/{acme_job}", headers=operator).status_code == 200
    assert api.get("/v1/summary", headers=OPS).json()["counts"]["queued"] == 3


def test_a_tenant_cannot_add_jobs_to_another_tenants_batch(api):
    acme = _submit(api, ACME, JOB)
    refused = api.post("/v1/jobs", json=JOB, headers=GLOBEX, params={"batch_id": acme["batch_id"]})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["field"] == "batch_id"
    in_body = api.post("/v1/jobs", json=JOB | {"batch_id": acme["batch_id"]}, headers=GLOBEX)
    assert in_body.status_code == 422
    assert api.get("/v1/jobs", headers=GLOBEX).json()["total"] == 0  # nothing was queued
    _submit(api, ACME, JOB, batch_id=acme["batch_id"])  # its own batch takes more
    assert api.get(f"/v1/batches/{acme['batch_id']}", headers=ACME).json()["counts"]["queued"] == 2


def test_each_tenant_has_its_own_cap_on_waiting_jobs(api):
    _submit(api, ACME, [JOB, JOB | {"seed": 4}, JOB | {"seed": 5}])
    full = api.post("/v1/jobs", json=JOB, headers=ACME)
    assert full.status_code == 429 and "LORAFLEET_MAX_QUEUED_PER_TENANT" in full.json()["detail"]
    assert api.get("/v1/jobs", headers=ACME).json()["total"] == 3
    _submit(api, GLOBEX, JOB)  # another tenant is not held back by acme's queue
    first = api.get("/v1/jobs", headers=ACME).json()["jobs"][0]["job_id"]
    api.delete(f"/v1/jobs/{first}", headers=ACME)  # no longer waiting: room for one more
    _submit(api, ACME, JOB | {"seed": 9})
    _submit(api, OPS, [JOB] * 5)  # an operator has no tenant cap


def test_a_dashboard_session_belongs_to_the_tenant_whose_token_opened_it(api):
    _submit(api, ACME, JOB)
    api.post("/login", data={"token": "globex-token"}, follow_redirects=False)
    assert api.get("/v1/jobs").json()["total"] == 0  # the cookie's tenant, not every job


@pytest.mark.parametrize(
    "raw, message",
    [
        ("Acme:x", "a tenant is 1-32 of a-z"),
        ("acme:", "a tenant is 1-32 of a-z"),
        ("acme:x, globex:x", "the same token twice"),
    ],
)
def test_a_bad_tokens_setting_is_refused_naming_it(raw, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_tokens(raw)
    assert "LORAFLEET_API_TOKENS" in str(caught.value)


def test_bare_and_admin_tokens_are_operators_and_the_rest_tenants():
    parsed = parse_tokens(TOKENS)
    assert [(t.token, t.tenant) for t in parsed] == [
        ("acme-token", "acme"),
        ("globex-token", "globex"),
        ("boss-token", None),
        ("ops-token", None),
    ]
