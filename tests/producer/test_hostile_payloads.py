"""Hypothesis-generated job payloads through the SDK, the HTTP API and the CLI.

Valid payloads are drawn from the documented ranges; an invalid one is a valid one with one
field broken. Every valid payload must be queued; every invalid one refused with an error
naming the broken field, and nothing of it queued.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.helpers import lorafleet_env, run_cli

TINY = "tiny-sd15"
SD15_LORAS = ["watercolor", "texture-locon", "ink-sketch", "lcm-lora-sd15"]
SAMPLERS = ["lcm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"]
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
SIZE = st.integers(8, 256).map(lambda n: n * 8)
WEIGHT = st.floats(-4, 4, allow_nan=False)

LORA = st.fixed_dictionaries(
    {"name": st.sampled_from(SD15_LORAS)},
    optional={"weight": WEIGHT, "text_encoder_weight": WEIGHT, "inject_trigger": st.booleans()},
)
VALID = st.fixed_dictionaries(
    {"model": st.just(TINY), "prompt": TEXT},
    optional={
        "negative_prompt": TEXT,
        "loras": st.lists(LORA, max_size=4, unique_by=lambda lora: lora["name"]),
        "sampler": st.sampled_from(SAMPLERS),
        "steps": st.integers(1, 150),
        "cfg_scale": st.floats(0, 30, allow_nan=False),
        "width": SIZE,
        "height": SIZE,
        "seed": st.integers(0, 2**32 - 1),
        "num_images": st.integers(1, 8),
        "output_prefix": st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,10}(/[a-z0-9][a-z0-9._-]{0,10}){0,3}\Z"),
        "priority": st.sampled_from(["high", "normal", "low"]),
        "tags": st.dictionaries(st.text(min_size=1, max_size=64), st.text(max_size=256), max_size=32),
        "lcm": st.booleans(),
    },
)
# (the field an error must name, how to break a valid payload)
BREAKS = st.sampled_from(
    [
        ("width", lambda job: job | {"width": 100}),
        ("height", lambda job: job | {"height": 4096}),
        ("steps", lambda job: job | {"steps": 0}),
        ("steps", lambda job: job | {"steps": 151}),
        ("cfg_scale", lambda job: job | {"cfg_scale": 30.5}),
        ("cfg_scale", lambda job: job | {"cfg_scale": float("nan")}),
        ("num_images", lambda job: job | {"num_images": 9}),
        ("seed", lambda job: job | {"seed": -1}),
        ("seed", lambda job: job | {"seed": 2**32}),
        ("prompt", lambda job: job | {"prompt": "x" * 2001}),
        ("prompt", lambda job: {k: v for k, v in job.items() if k != "prompt"}),
        ("sampler", lambda job: job | {"sampler": "plms"}),
        ("priority", lambda job: job | {"priority": "urgent"}),
        ("colour", lambda job: job | {"colour": "red"}),
        ("loras", lambda job: job | {"loras": [{"name": "watercolor"}] * 9}),
        ("loras[0].weight", lambda job: job | {"loras": [{"name": "watercolor", "weight": 4.5}]}),
        ("loras[0].name", lambda job: job | {"loras": [{"name": "../watercolor"}]}),
        ("loras[0].name", lambda job: job | {"loras": [{"name": "sub/watercolor"}]}),
        ("loras[0].name", lambda job: job | {"loras": [{"name": "no-such-lora"}]}),
        ("output_prefix", lambda job: job | {"output_prefix": "../../etc"}),
        ("output_prefix", lambda job: job | {"output_prefix": "/absolute"}),
        ("model", lambda job: job | {"model": "../models/tiny-sd15"}),
    ]
)
EXAMPLES = hypothesis_settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def queued(redis) -> int:
    return sum(redis.llen(key) for key in keys.priority_lists(keys.queue(TINY)))


def refusal_names(problems, field: str) -> bool:
    return any(name == field or name.startswith(field + ".") for name, _ in problems)


@pytest.fixture
def client(settings):
    with Client(settings) as c:
        yield c


def test_sdk_queues_every_valid_payload_and_refuses_every_broken_one(client):
    @given(job=VALID, broken=BREAKS)
    @EXAMPLES
    def check(job, broken):
        before = queued(client.redis)
        handle = client.submit(job)
        assert client.get(handle.job_id).status.value == "queued"
        assert queued(client.redis) == before + 1
        field, breaking = broken
        with pytest.raises(JobRejected) as refused:
            client.submit(breaking(job))
        assert refusal_names(refused.value.problems, field), (field, refused.value.problems)
        assert queued(client.redis) == before + 1

    check()


def test_http_api_answers_201_for_valid_payloads_and_422_naming_the_field_for_broken_ones(settings):
    with TestClient(create_app(settings)) as api:
        redis = api.app.state.client.redis

        @given(job=VALID, broken=BREAKS)
        @EXAMPLES
        def check(job, broken):
            before = queued(redis)
            made = api.post("/v1/jobs", content=json.dumps(job), headers={"content-type": "application/json"})
            assert made.status_code == 201, made.text
            field, breaking = broken
            refused = api.post(
                "/v1/jobs", content=json.dumps(breaking(job)), headers={"content-type": "application/json"}
            )
            assert refused.status_code == 422, refused.text
            problems = [(p["field"], p["message"]) for p in refused.json()["detail"]]
            assert refusal_names(problems, field), problems
            assert queued(redis) == before + 1

        check()


@pytest.mark.slow
def test_cli_submit_file_refuses_broken_lines_naming_the_field(settings, home, redis_url, tmp_path):
    env = lorafleet_env(home, redis_url)
    redis = Client(settings).redis

    @given(job=VALID, broken=BREAKS)
    @hypothesis_settings(
        max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(job, broken):
        field, breaking = broken
        before = queued(redis)
        path = tmp_path / "jobs.jsonl"
        path.write_text(json.dumps(job) + "\n" + json.dumps(breaking(job)) + "\n")
        result = run_cli(["submit-file", str(path)], env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"refused: jobs[1].{field}" in " ".join(result.stderr.split())
        assert queued(redis) == before  # all or none: the good line is not queued either
        path.write_text(json.dumps(job) + "\n")
        assert run_cli(["submit-file", str(path)], env).returncode == 0
        assert queued(redis) == before + 1

    check()
