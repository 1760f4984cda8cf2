"""The job schema refuses bad input naming the field and what is allowed."""

from __future__ import annotations

import pytest

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import (
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    GenerationJob,
    JobRecord,
    JobStatus,
    Sampler,
    parse_job,
)

BASE = {"model": "tiny-sd15", "prompt": "a lighthouse"}


def refused(**fields) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        parse_job(BASE | fields)
    return caught.value


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"width": 100}, "width", "multiple of 8 from 64 to 2048"),
        ({"height": 4096}, "height", "multiple of 8 from 64 to 2048"),
        ({"width": 56}, "width", "from 64"),
        ({"steps": 0}, "steps", "must be a whole number from 1 to 150, got 0"),
        ({"steps": 151}, "steps", "from 1 to 150, got 151"),
        ({"steps": 2.5}, "steps", "integer"),
        ({"cfg_scale": 31}, "cfg_scale", "must be a number from 0 to 30, got 31"),
        ({"cfg_scale": float("nan")}, "cfg_scale", "from 0 to 30, got nan"),
        ({"seed": -1}, "seed", "from 0 to 4294967295, got -1"),
        ({"seed": 2**32}, "seed", "from 0 to 4294967295"),
        ({"num_images": 9}, "num_images", "from 1 to 8, got 9"),
        ({"loras": [{"name": "a", "weight": 5}]}, "loras[0].weight", "from -4 to 4, got 5"),
        (
            {"loras": [{"name": "a", "text_encoder_weight": -5}]},
            "loras[0].text_encoder_weight",
            "from -4 to 4",
        ),
        ({"loras": [{"name": "../etc/passwd"}]}, "loras[0].name", "no path separators"),
        ({"loras": [{"name": "a", "extra": 1}]}, "loras[0].extra", "unknown field"),
        ({"loras": [{"name": f"l{i}"} for i in range(MAX_LORAS + 1)]}, "loras", "at most 8"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", "at most 2000 characters"),
        ({"negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt", "at most 2000"),
        ({"sampler": "plms"}, "sampler", "allowed: lcm (LCM), lcm_trailing (LCM SGM Uniform)"),
        ({"priority": "urgent"}, "priority", "'high', 'normal' or 'low'"),
        ({"output_prefix": "../up"}, "output_prefix", "segments of letters"),
        ({"output_prefix": "/abs"}, "output_prefix", "segments of letters"),
        ({"job_id": "has space"}, "job_id", "pattern"),
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "tags", "at most 32 tags"),
        ({"colour": "red"}, "colour", "unknown field (allowed fields: batch_id, batch_size, cfg_scale"),
    ],
)
def test_refusal_names_the_field_and_what_is_allowed(fields, field, words):
    error = refused(**fields)
    assert error.field == field
    assert words in str(error), str(error)


def test_every_bad_field_is_reported_at_once():
    error = refused(width=100, steps=0, colour="red")
    assert {f for f, _ in error.problems} == {"width", "steps", "colour"}


def test_defaults_follow_the_sampler():
    standard = parse_job(BASE)
    assert (standard.sampler, standard.steps, standard.cfg_scale) == (Sampler.euler_a, 25, 7.0)
    lcm = parse_job(BASE | {"sampler": "lcm"})
    assert (lcm.steps, lcm.cfg_scale) == (4, 1.0)


def test_lcm_recipe_sets_the_sampler_but_explicit_values_win():
    job = parse_job(BASE | {"lcm": True, "steps": 6})
    assert (job.sampler, job.steps, job.cfg_scale) == (Sampler.lcm, 6, 1.0)
    explicit = parse_job(BASE | {"lcm": True, "sampler": "euler"})
    assert explicit.sampler is Sampler.euler


def test_lcm_outside_the_seed_range_warns_but_changes_nothing():
    job = parse_job(BASE | {"sampler": "lcm", "steps": 12, "cfg_scale": 4})
    assert (job.steps, job.cfg_scale) == (12, 4.0)
    advice = job.advice()
    assert any("steps=12" in a for a in advice) and any("cfg_scale=4" in a for a in advice)
    assert parse_job(BASE | {"sampler": "lcm", "steps": 8, "cfg_scale": 2}).advice() == []


def test_a_parsed_job_round_trips_through_json_unchanged():
    job = parse_job(BASE | {"loras": [{"name": "watercolor", "weight": 0.8}], "seed": 7, "width": 512})
    again = GenerationJob.model_validate_json(job.model_dump_json())
    assert again == job
    record = JobRecord(job=again)
    assert JobRecord.model_validate_json(record.model_dump_json()) == record
    assert record.status is JobStatus.queued and not record.status.final


def test_non_object_job_is_refused():
    with pytest.raises(JobRejected, match="must be a JSON object"):
        parse_job(["not", "a", "job"])  # type: ignore[arg-type]
