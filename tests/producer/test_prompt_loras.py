"""LoRA tags in prompts become the job's stack at submit, or are refused naming the tag."""

from __future__ import annotations

import pytest

from lorafleet.common.schema.errors import JobRejected
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.producer.test_client import queued_messages

JOB = {"model": TINY, "prompt": "a lighthouse"}


@pytest.fixture
def client(settings):
    with Client(settings) as c:
        yield c


def refused(client, **fields) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        client.submit(JOB | fields)
    assert queued_messages(client) == []
    return caught.value


def test_tags_join_the_stack_after_the_listed_loras_in_the_order_written(client):
    handle = client.submit(
        JOB
        | {
            "prompt": "<lora:lcm-lora-sd15:0.35> a (lighthouse:1.2) <lora:watercolor> at night",
            "loras": [{"name": "ink-sketch", "weight": 0.5}],
        }
    )
    job = client.get(handle.job_id).job
    assert [(s.name, s.weight) for s in job.loras] == [
        ("ink-sketch", 0.5),
        ("lcm-lora-sd15", 0.35),
        ("watercolor", 0.45),  # no weight: InvokeAI's LoRA guidance beside an LCM-LoRA
    ]
    assert all(s.sha256 for s in job.loras)
    assert job.prompt == "a (lighthouse:1.2) at night"


def test_named_te_and_unet_weights(client):
    job = client.submit(JOB | {"prompt": "x <lora:watercolor:unet=0.6:te=0.2>"}).job
    assert (job.loras[0].weight, job.loras[0].text_encoder_weight) == (0.6, 0.2)


def test_a_tag_repeating_a_listed_lora_at_the_same_weight_is_one_entry(client):
    job = client.submit(
        JOB | {"prompt": "x <lora:watercolor:0.8>", "loras": [{"name": "watercolor", "weight": 0.8}]}
    ).job
    assert [(s.name, s.weight) for s in job.loras] == [("watercolor", 0.8)]


def test_a_tag_and_a_listed_lora_with_other_weights_are_refused_naming_both(client):
    error = refused(client, prompt="x <lora:watercolor:0.5>", loras=[{"name": "watercolor", "weight": 0.8}])
    assert "loras[0] (weight 0.8)" in str(error) and "<lora:watercolor:0.5> (weight 0.5)" in str(error)
    assert error.field == "prompt"


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"prompt": "x <lora:no-such-lora:0.5>"}, "prompt", "tag <lora:no-such-lora:0.5>"),
        ({"prompt": "x <lora:watercolor:lots>"}, "prompt", "'lots' is not a number"),
        ({"prompt": "x <lora:watercolor:9>"}, "prompt", "from -4 to 4"),
        ({"prompt": "x <lora::1>"}, "prompt", "has no LoRA name"),
        ({"prompt": "x <lora:watercolor:1:1:1>"}, "prompt", "at most 2"),
        ({"prompt": "x <lora:watercolor:dyn=4>"}, "prompt", "allowed: te=, unet="),
        ({"prompt": "x <hypernet:anime:1>"}, "prompt", "hypernetworks are not supported"),
        ({"negative_prompt": "<lora:watercolor:1>"}, "negative_prompt", "LoRA tags in the prompt"),
        ({"prompt": "x " + "<lora:watercolor:1> " * 9}, "loras", "at most 8 LoRAs"),
    ],
)
def test_bad_tags_are_refused_naming_the_field(client, fields, field, words):
    error = refused(client, **fields)
    assert error.field == field
    assert words in str(error), str(error)


def test_other_extra_network_tags_are_taken_out_with_a_warning(client):
    handle = client.submit(JOB | {"prompt": "a <wildcard:colour> lighthouse"})
    assert handle.job.prompt == "a lighthouse" and handle.job.loras == []
    assert any("<wildcard:colour> is not a LoRA tag" in w for w in handle.warnings)


def test_a_sampler_may_be_named_as_a1111_writes_it(client):
    job = client.submit(JOB | {"sampler": "DPM++ 2M SDE Karras"}).job
    assert job.sampler.value == "dpmpp_2m_sde_karras"
