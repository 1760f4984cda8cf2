"""The HTTP API against a real Redis (and moto's S3 server): the SDK's jobs and errors over JSON."""

from __future__ import annotations

import time

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from lorafleet.common.fleet.workers import WorkerBeat, WorkerRegistry
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus, parse_job
from lorafleet.producer.api import create_app
from tests.conftest import TINY, TINY_XL
from tests.helpers import beat_aged

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 3}

JSON_CALL = {"Content-Type": "application/json"}
"""What a call that changes state must say (producer/api/guard.py)."""


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def submit(api, body, **params) -> dict:
    response = api.post("/v1/jobs", json=body, params=params)
    assert response.status_code == 201, response.text
    return response.json()


def test_submit_get_list_cancel_and_retry(api):
    made = submit(api, JOB | {"loras": [{"name": "watercolor", "weight": 0.8}]})
    job_id = made["jobs"][0]["job_id"]
    assert made["jobs"][0]["queue"] == "lorafleet.model.tiny-sd15"
    record = api.get(f"/v1/jobs/{job_id}").json()
    assert record["status"] == "queued" and record["job"]["loras"][0]["sha256"]
    assert record["cli"].startswith(
        "lorafleet submit --model tiny-sd15 --prompt 'a lighthouse' --lora watercolor:0.8"
    )
    assert api.get("/v1/jobs").json()["total"] == 1
    assert api.post(f"/v1/jobs/{job_id}/retry", headers=JSON_CALL).status_code == 409
    cancelled = api.delete(f"/v1/jobs/{job_id}", headers=JSON_CALL).json()
    assert cancelled["status"] == "cancelled"
    retried = api.post(f"/v1/jobs/{job_id}/retry", headers=JSON_CALL)
    assert retried.status_code == 201
    again = retried.json()
    assert again["retry_of"] == job_id and again["job_id"] != job_id
    assert again["job"]["batch_id"] == record["job"]["batch_id"] and again["job"]["seed"] == 3
    assert api.get(f"/v1/batches/{record['job']['batch_id']}").json()["counts"] == {
        "queued": 1,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }


@pytest.mark.parametrize(
    "body",
    [
        JOB | {"width": 100},
        JOB | {"steps": 0, "colour": "red"},
        JOB | {"loras": [{"name": "missing"}]},
        [JOB, JOB | {"cfg_scale": 99}],
    ],
)
def test_refusals_name_the_same_fields_as_the_sdk_and_queue_nothing(api, settings, body):
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422
    fields = [p["field"] for p in response.json()["detail"]]
    if isinstance(body, dict) and "loras" not in body:
        with pytest.raises(JobRejected) as caught:
            parse_job(body)
        assert response.json()["detail"] == [{"field": f, "message": m} for f, m in caught.value.problems]
    assert fields and all(fields)
    assert api.get("/v1/jobs").json()["total"] == 0


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[]", b"42", b'"a string"'])
def test_bodies_that_are_not_jobs_are_422_not_500(api, raw):
    response = api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] in ("body", "job")


def test_filters_and_paging(api):
    first = submit(api, [JOB, JOB, JOB])["batch_id"]
    submit(api, [JOB | {"model": TINY_XL}])
    api.delete(
        f"/v1/jobs/{api.get('/v1/jobs', params={'batch': first}).json()['jobs'][0]['job_id']}",
        headers=JSON_CALL,
    )
    assert api.get("/v1/jobs").json()["total"] == 4
    assert api.get("/v1/jobs", params={"batch": first}).json()["total"] == 3
    assert api.get("/v1/jobs", params={"model": TINY_XL}).json()["total"] == 1
    assert api.get("/v1/jobs", params={"status": "cancelled"}).json()["total"] == 1
    assert api.get("/v1/jobs", params={"status": "queued", "batch": first}).json()["total"] == 2
    page = api.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert len(page["jobs"]) == 2 and page["total"] == 4
    newest = api.get("/v1/jobs", params={"limit": 1}).json()["jobs"][0]
    assert newest["job"]["model"] == TINY_XL
    assert api.get("/v1/jobs", params={"status": "nope"}).status_code == 422
    assert api.get("/v1/jobs", params={"limit": 100000}).status_code == 422


def test_expired_records_leave_the_listing(api, settings):
    made = submit(api, [JOB, JOB])
    api.app.state.client.redis.delete(keys.job(made["jobs"][0]["job_id"]))
    page = api.get("/v1/jobs").json()
    assert page["total"] == 1 and [j["job_id"] for j in page["jobs"]] == [made["jobs"][1]["job_id"]]
    assert api.get("/v1/jobs").json()["total"] == 1


def test_queues_summary_and_metrics(api, settings):
    submit(api, [JOB, JOB | {"priority": "high"}, JOB | {"priority": "low"}])
    registry = WorkerRegistry(api.app.state.client.redis)
    now = time.time()
    beat = dict(host="h", pid=1, version="x", device="cpu", models=[TINY], started_at=now)
    beat_aged(registry, WorkerBeat(name="alive-1", last_seen=now, **beat))
    beat_aged(registry, WorkerBeat(name="stale-1", last_seen=now - 30, **beat))
    beat_aged(registry, WorkerBeat(name="gone-1", last_seen=now - 600, **beat))
    beat_aged(registry, WorkerBeat(name="forgotten", last_seen=now - 7200, **beat))
    queues = {q["model"]: q for q in api.get("/v1/queues").json()}
    assert queues[TINY]["depth"] == 3 and queues[TINY]["by_priority"] == {"0": 1, "3": 1, "6": 1, "9": 0}
    assert queues[TINY]["workers"] == ["alive-1"] and queues[TINY]["stale_workers"] == ["stale-1"]
    assert queues[TINY_XL]["depth"] == 0 and queues[TINY_XL]["workers"] == []
    workers = {w["name"]: w["liveness"] for w in api.get("/v1/workers").json()}
    assert workers == {"alive-1": "alive", "stale-1": "stale", "gone-1": "gone"}
    summary = api.get("/v1/summary").json()
    assert summary["counts"]["queued"] == 3 and len(summary["throughput"]) == 60
    metrics = api.get("/metrics").text
    assert 'lorafleet_queue_depth{model="tiny-sd15"} 3' in metrics
    assert 'lorafleet_jobs{status="queued"} 3' in metrics
    assert 'lorafleet_workers{liveness="alive"} 1' in metrics
    assert "# TYPE lorafleet_phase_seconds summary" in metrics
    # The exposition parses, and keeps the metric names dashboards and alerts were built on.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert {
        "lorafleet_queue_depth",
        "lorafleet_jobs",
        "lorafleet_jobs_finished_total",
        "lorafleet_phase_seconds_sum",
        "lorafleet_phase_seconds_count",
        "lorafleet_lora_cache_hits_total",
        "lorafleet_lora_cache_misses_total",
        "lorafleet_workers",
        "lorafleet_images_last_hour",
    } <= samples
    assert api.get("/healthz").json()["ok"] is True


def test_unknown_ids_are_404(api):
    for path in ("/v1/jobs/nope", "/v1/batches/nope", "/v1/jobs/nope/images/0"):
        assert api.get(path).status_code == 404
    assert api.delete("/v1/jobs/nope", headers=JSON_CALL).status_code == 404


def test_images_come_through_the_app_from_a_local_store(api, settings):
    from tests.worker.conftest import make_runner  # the worker side renders the job

    job_id = submit(api, JOB)["jobs"][0]["job_id"]
    make_runner(settings).run(job_id)
    record = api.get(f"/v1/jobs/{job_id}").json()
    assert record["status"] == "succeeded"
    response = api.get(record["image_urls"][0])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert api.get(f"/v1/jobs/{job_id}/images/1").status_code == 404


def test_images_in_s3_are_presigned_redirects(settings, s3_credentials):
    from tests.worker.conftest import make_runner

    boto3.client("s3", endpoint_url=s3_credentials.endpoint).create_bucket(Bucket="api-images")
    s3 = settings.model_copy(
        update={"storage_url": "s3://api-images/out", "s3_endpoint_url": s3_credentials.endpoint}
    )
    with TestClient(create_app(s3)) as api:
        job_id = submit(api, JOB)["jobs"][0]["job_id"]
        make_runner(s3).run(job_id)
        response = api.get(f"/v1/jobs/{job_id}/images/0", follow_redirects=False)
        assert response.status_code == 307
        location = response.headers["location"]
        assert location.startswith(s3_credentials.endpoint) and "X-Amz-Signature" in location
        fetched = httpx.get(location)
        assert fetched.status_code == 200 and fetched.content[:4] == b"\x89PNG"


def test_tokens_guard_every_call_and_the_dashboard(settings):
    guarded = settings.model_copy(update={"api_tokens": "s3cret-one, s3cret-two"})
    with TestClient(create_app(guarded)) as api:
        assert api.get("/v1/jobs").status_code == 401
        assert api.post("/v1/jobs", json=JOB).status_code == 401
        assert api.get("/metrics").status_code == 401
        assert api.get("/openapi.json").status_code == 401
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer s3cret-two"}).status_code == 200
        page = api.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/"
        assert api.get("/login").status_code == 200 and api.get("/healthz").status_code == 200
        bad = api.post(
            "/login",
            content="token=nope&next=/",
            headers={"content-type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert bad.status_code == 401 and "not one of" in bad.text
        good = api.post(
            "/login",
            content="token=s3cret-one&next=/jobs/x",
            headers={"content-type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert good.status_code == 303 and good.headers["location"] == "/jobs/x"
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        for path, script in (("/", "overview.js"), ("/jobs/x", "job.js"), ("/batches/y", "batch.js")):
            page = api.get(path)  # the cookie now rides along
            assert (
                page.status_code == 200 and f'src="/static/{script}"' in page.text and "log out" in page.text
            )
        assert api.get("/v1/jobs").status_code == 200
        assert "s3cret" not in api.get("/v1/summary").text
        session = api.cookies["lorafleet_session"]
        assert "s3cret" not in session and "s3cret" not in cookie  # a session id, never the token
        api.post("/logout", follow_redirects=False)
        api.cookies.set("lorafleet_session", session)  # the old cookie, kept by an attacker
        assert api.get("/v1/jobs").status_code == 401  # log out ended the session itself


def test_a_session_ends_when_its_token_is_no_longer_configured(settings):
    first = settings.model_copy(update={"api_tokens": "old-token"})
    with TestClient(create_app(first)) as api:
        api.post("/login", data={"token": "old-token"}, follow_redirects=False)
        session = api.cookies["lorafleet_session"]
        assert api.get("/v1/jobs").status_code == 200
    rotated = settings.model_copy(update={"api_tokens": "new-token"})
    with TestClient(create_app(rotated)) as api:
        api.cookies.set("lorafleet_session", session)
        assert api.get("/v1/jobs").status_code == 401


def test_login_never_redirects_off_site(settings):
    guarded = settings.model_copy(update={"api_tokens": "t"})
    with TestClient(create_app(guarded)) as api:
        response = api.post(
            "/login",
            content="token=t&next=//evil.example/",
            follow_redirects=False,
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert response.headers["location"] == "/"


def test_openapi_docs_are_served_and_describe_the_job_body(api):
    schema = api.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["oneOf"][0] == {"$ref": "#/components/schemas/GenerationJob"}
    assert "GenerationJob" in schema["components"]["schemas"]
    assert api.get("/docs").status_code == 200


def test_records_in_redis_are_the_source_the_api_reads(api, settings):
    job_id = submit(api, JOB)["jobs"][0]["job_id"]
    lifecycle = api.app.state.client.lifecycle

    def fail(record):
        record.status, record.error = JobStatus.failed, "out of memory on cuda:0"
        return record

    lifecycle.change(job_id, fail)
    record = api.get(f"/v1/jobs/{job_id}").json()
    assert (record["status"], record["error"]) == ("failed", "out of memory on cuda:0")


def test_require_worker_is_a_422_naming_the_model_and_queues_nothing(api):
    response = api.post("/v1/jobs", json=JOB, params={"require_worker": "true"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "model"
    assert "no live worker serves 'tiny-sd15'" in response.json()["detail"][0]["message"]
    assert api.get("/v1/jobs").json()["total"] == 0
    warned = submit(api, JOB)["jobs"][0]["warnings"]
    assert any("no live worker serves 'tiny-sd15'" in w for w in warned)


def test_paging_refuses_offsets_past_the_limit_instead_of_failing(api):
    assert api.get("/v1/jobs", params={"offset": 10**9}).status_code == 200
    refused = api.get("/v1/jobs", params={"offset": 2**63 - 10})
    assert refused.status_code == 422 and "offset" in refused.text


def test_without_tokens_the_pages_offer_no_log_out(api):
    page = api.get("/")
    assert page.status_code == 200 and '<a class="brand" href="/">lorafleet</a>' in page.text
    assert "log out" not in page.text and 'id="jobs"' in page.text


def test_lora_tags_through_the_api_give_the_resolved_stack_and_the_schema_documents_new_fields(api):
    made = submit(api, JOB | {"prompt": "a (lighthouse:1.2) <lora:watercolor:0.3:0.8>", "clip_skip": 2})
    record = api.get(f"/v1/jobs/{made['jobs'][0]['job_id']}").json()
    [lora] = record["job"]["loras"]
    assert (lora["name"], lora["weight"], lora["text_encoder_weight"]) == ("watercolor", 0.8, 0.3)
    assert record["job"]["prompt"] == "a (lighthouse:1.2)"
    assert "--lora watercolor:0.8:0.3 --sampler euler_a" in record["cli"] and "--clip-skip 2" in record["cli"]
    merged = submit(api, JOB | {"prompt": "x <lora:watercolor:0.5>", "loras": [{"name": "watercolor"}]})
    [lora] = api.get(f"/v1/jobs/{merged['jobs'][0]['job_id']}").json()["job"]["loras"]
    assert lora["weight"] == 0.5  # a listed LoRA without a weight takes the tag's
    refused = api.post("/v1/jobs", json=JOB | {"clip_skip": 13})
    assert refused.status_code == 422
    assert refused.json()["detail"] == [
        {"field": "clip_skip", "message": "must be a whole number from 1 to 12, got 13"}
    ]
    job = api.get("/openapi.json").json()["components"]["schemas"]["GenerationJob"]["properties"]
    assert job["clip_skip"]["minimum"] == 1 and job["clip_skip"]["maximum"] == 12
    assert "A1111" in job["sampler"]["description"] and "DPM++ 2M SDE Karras" in job["sampler"]["description"]
    assert "compel" in job["prompt_syntax"]["description"]


def test_queues_cover_registered_and_served_models_not_every_name_ever_submitted(api):
    api.app.state.client.redis.sadd(keys.MODELS_WITH_JOBS, "/some/old/path", "acme/once-used")
    listed = {queue["model"] for queue in api.get("/v1/queues").json()}
    assert listed == {"tiny-sd15", "tiny-sd2", "tiny-sdxl"}
    assert "acme/once-used" not in api.get("/metrics").text
