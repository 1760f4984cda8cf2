"""Records that cannot be broken: what the resolver adds is validated before a record is
written, and a record damaged in Redis shows as damaged instead of breaking every view."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import MAX_PROMPT_CHARS, JobStatus
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.conftest import TINY
from tests.worker.conftest import make_runner

FULL_PROMPT = "a" * MAX_PROMPT_CHARS
"""A prompt at the limit: injecting the watercolor LoRA's trigger words makes it too long."""

JSON_CALL = {"Content-Type": "application/json"}
"""What a call that changes state must say (producer/api/guard.py)."""


@pytest.fixture
def api(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def test_a_prompt_grown_past_the_limit_by_trigger_words_is_refused_at_submit(api, settings):
    body = {"model": TINY, "prompt": FULL_PROMPT, "loras": [{"name": "watercolor", "inject_trigger": True}]}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["field"] == "prompt" and "trigger words" in problem["message"]
    with Client(settings) as client:
        assert client.redis.zcard(keys.ALL_JOBS) == 0
        assert client.redis.llen(keys.queue(TINY)) == 0


def damage(client: Client, job_id: str, how) -> None:
    key = keys.job(job_id)
    client.redis.set(key, how(client.redis.get(key).decode()))


@pytest.mark.parametrize(
    "how",
    [
        lambda raw: raw.replace('"prompt":"a lighthouse"', '"prompt":"' + "x" * (MAX_PROMPT_CHARS + 1) + '"'),
        lambda raw: raw[: len(raw) // 2],
        lambda raw: json.dumps({"job": 5}),
    ],
    ids=["invalid", "truncated", "wrong shape"],
)
def test_a_damaged_record_shows_as_damaged_and_breaks_no_view(api, settings, how):
    with Client(settings) as client:
        good = client.submit({"model": TINY, "prompt": "a lighthouse"})
        bad = client.submit({"model": TINY, "prompt": "a lighthouse"}, batch_id=good.batch_id)
        damage(client, bad.job_id, how)
        listing = api.get("/v1/jobs")
        assert listing.status_code == 200, listing.text
        shown = {item["job_id"]: item for item in listing.json()["jobs"]}
        assert shown[good.job_id]["status"] == "queued"
        assert shown[bad.job_id]["damaged"] is True and shown[bad.job_id]["status"] == "failed"
        single = api.get(f"/v1/jobs/{bad.job_id}")
        assert single.status_code == 200 and "damaged" in single.json()["error"]
        assert api.get(f"/v1/batches/{good.batch_id}").status_code == 200
        assert api.delete(f"/v1/jobs/{bad.job_id}", headers=JSON_CALL).status_code == 409
        assert api.get("/").status_code in (200, 307)
        assert client.get(bad.job_id).damaged
        runner = make_runner(settings)
        assert runner.run(bad.job_id) is JobStatus.failed  # skipped, and the message acked
        assert runner.run(good.job_id) is JobStatus.succeeded


def test_the_cli_shows_damaged_records_and_never_writes_control_characters(settings, monkeypatch):
    from typer.testing import CliRunner

    from lorafleet.producer.cli import app

    for key, value in settings.model_dump(mode="json", exclude_none=True).items():
        if isinstance(value, (str, int, float, bool)):
            monkeypatch.setenv(f"LORAFLEET_{key.upper()}", str(value))
    with Client(settings) as client:
        hostile = client.submit(
            {"model": TINY, "prompt": "a lighthouse\x1b[2J\x1b]0;owned\x07\x9b31m", "tags": {"k": "\x1bc"}}
        )
        bad = client.submit({"model": TINY, "prompt": "a lighthouse"}, batch_id=hostile.batch_id)
        damage(client, bad.job_id, lambda raw: raw[:20])
    runner = CliRunner()
    for args in (["status", hostile.job_id], ["status", bad.job_id], ["status", "--batch", hostile.batch_id]):
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert not any(c in result.output for c in "\x1b\x07\x9b"), repr(result.output)
    assert "\\x1b[2J" in runner.invoke(app, ["status", hostile.job_id], env={"COLUMNS": "200"}).output
    assert "damaged" in runner.invoke(app, ["status", bad.job_id]).output
