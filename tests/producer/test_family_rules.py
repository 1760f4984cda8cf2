"""What a job may ask of a flow-matching family at submit, and the family's defaults: each
refusal names the field and what is allowed, and nothing refused reaches the queue."""

from __future__ import annotations

import pytest

from lorafleet.common.schema.errors import JobRejected
from lorafleet.producer import Client
from lorafleet.worker.tiny import make_tiny_model
from tests.conftest import TINY
from tests.producer.test_client import queued_messages

DEV, SCHNELL = "tiny-flux1", "tiny-flux1-schnell"


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-models")
    make_tiny_model(root / DEV, family="flux1")
    make_tiny_model(root / SCHNELL, family="flux1-schnell")
    return root


@pytest.fixture
def client(settings, flux_models):
    import shutil

    for name in (DEV, SCHNELL):
        shutil.copytree(flux_models / name, settings.home / "models" / name)
    with Client(settings) as c:
        yield c


def refused(client, **fields) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        client.submit({"model": DEV, "prompt": "a lighthouse"} | fields)
    assert queued_messages(client) == []
    return caught.value


def test_a_flux_dev_job_gets_the_reference_pipelines_defaults(client):
    job = client.get(client.submit({"model": DEV, "prompt": "a lighthouse"}).job_id).job
    assert (job.sampler.value, job.steps, job.cfg_scale, job.guidance) == ("euler", 28, 1.0, 3.5)
    given = client.get(
        client.submit({"model": DEV, "prompt": "x", "steps": 4, "cfg_scale": 3.0, "guidance": 2.5}).job_id
    ).job
    assert (job.width, given.steps, given.cfg_scale, given.guidance) == (job.height, 4, 3.0, 2.5)


def test_a_null_steps_or_cfg_gets_the_familys_default_not_sds(client):
    from lorafleet.common.schema.jobs import GenerationJob

    by_json = client.get(
        client.submit({"model": DEV, "prompt": "x", "steps": None, "cfg_scale": None}).job_id
    ).job
    by_sdk = client.get(
        client.submit(GenerationJob(model=DEV, prompt="x", steps=None, cfg_scale=None)).job_id
    ).job
    assert (by_json.steps, by_json.cfg_scale) == (by_sdk.steps, by_sdk.cfg_scale) == (28, 1.0)


def test_schnell_has_no_guidance_by_default_and_refuses_one(client):
    job = client.get(client.submit({"model": SCHNELL, "prompt": "a lighthouse"}).job_id).job
    assert job.guidance is None
    error = refused(client, model=SCHNELL, guidance=3.5)
    assert error.field == "guidance" and "schnell" in error.reason


def test_guidance_on_an_sd_model_is_refused_naming_the_family(client):
    with pytest.raises(JobRejected) as caught:
        client.submit({"model": TINY, "prompt": "a lighthouse", "guidance": 3.5})
    assert caught.value.field == "guidance" and "SD 1.5" in caught.value.reason
    assert "cfg_scale is this model's guidance" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"sampler": "dpmpp_2m_karras"}, "sampler", "flow-match Euler"),
        ({"lcm": True}, "lcm", "no LCM-LoRA"),
        ({"clip_skip": 2}, "clip_skip", "FLUX.1"),
        ({"prompt_syntax": "compel"}, "prompt_syntax", "CLIP"),
        ({"embeddings": ["easynegative"]}, "embeddings", "textual-inversion"),
        ({"vae": "some-vae"}, "vae", "its own VAE"),
    ],
)
def test_what_flux_does_not_have_is_refused_naming_the_field_and_the_family(client, fields, field, words):
    error = refused(client, **fields)
    assert error.field == field and words in error.reason and "FLUX.1" in error.reason


def test_a1111_weights_on_t5_are_dropped_with_a_warning(client):
    handle = client.submit({"model": DEV, "prompt": "a (lighthouse:1.3) BREAK at night"})
    record = client.get(handle.job_id)
    assert (
        record.job.prompt == "a (lighthouse:1.3) BREAK at night"
    )  # kept as given; the worker reads the words
    assert any("T5" in w and "plain words" in w for w in record.warnings)


def test_the_api_documents_guidance(settings):
    from lorafleet.producer.api import create_app

    schema = create_app(settings).openapi()
    fields = schema["components"]["schemas"]["GenerationJob"]["properties"]
    assert "Distilled CFG Scale" in str(fields["guidance"]) and "neg + cfg" in str(fields["cfg_scale"])


def test_a_klein_9b_lora_on_a_klein_4b_model_is_refused_naming_both_widths(client, settings):
    """LoRAs do not cross variants: the model's width (its transformer config) against the
    LoRA's (its factor shapes). Only configs are needed at submit, so real sizes are cheap."""
    import json

    from tests.common.test_family_detection import K9, wild, write_safetensors

    folder = settings.home / "models" / "klein-4b"
    for sub, config in {
        "transformer": {
            "_class_name": "Flux2Transformer2DModel",
            "num_attention_heads": 24,
            "attention_head_dim": 128,
        },
        "vae": {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512]},
    }.items():
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    write_safetensors(
        settings.home / "autoimport" / "lora" / "klein9.safetensors", wild("flux2-klein-9b-bfl")
    )
    with pytest.raises(JobRejected) as caught:
        client.submit({"model": "klein-4b", "prompt": "a lighthouse", "loras": [{"name": "klein9"}]})
    assert caught.value.field == "loras[0].name"
    assert f"{K9} wide (klein-9b)" in str(caught.value) and "is 3072 wide" in str(caught.value)
    assert queued_messages(client) == []


def test_schnell_defaults_to_few_steps_without_cfg_and_sizes_are_multiples_of_16(client):
    job = client.get(client.submit({"model": SCHNELL, "prompt": "a lighthouse"}).job_id).job
    assert (job.steps, job.cfg_scale) == (4, 1.0)
    error = refused(client, width=72)
    assert error.field == "width" and "multiples of 16" in error.reason and "64 or 80" in str(error)


def test_a_step_distilled_klein_defaults_to_4_steps_and_warns_that_cfg_is_ignored(client, settings, tmp_path):
    import json

    folder = make_tiny_model(settings.home / "models" / "klein-distilled", family="flux2")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"is_distilled": True}))
    job = client.get(client.submit({"model": "klein-distilled", "prompt": "x"}).job_id).job
    assert (job.steps, job.cfg_scale, job.guidance) == (4, 1.0, None)
    record = client.get(client.submit({"model": "klein-distilled", "prompt": "x", "cfg_scale": 4.0}).job_id)
    assert any("ignored by step-distilled FLUX.2 Klein" in w for w in record.warnings)


@pytest.mark.slow  # the `lorafleet` command as a process
def test_the_cli_takes_guidance_and_the_resubmit_command_keeps_it(client, settings):
    import json
    import shlex

    from lorafleet.producer.api.views import resubmit_command
    from tests.helpers import lorafleet_env, run_cli

    env = lorafleet_env(settings.home, settings.broker_url)
    result = run_cli(
        ["submit", "--model", DEV, "--prompt", "a lighthouse", "--guidance", "2.5", "--json"]
        + ["--lora-mode", "side", "--batch-size", "3"],
        env,
    )
    assert result.returncode == 0, result.stderr
    record = client.get(json.loads(result.stdout)[0]["job_id"])
    assert record.job.guidance == 2.5
    assert record.job.lora_mode.value == "side" and record.job.batch_size == 3
    command = shlex.split(resubmit_command(record.job))
    assert command[command.index("--guidance") + 1] == "2.5"
    assert "--lora-mode" not in command  # no LoRA: the mode says nothing
    assert command[command.index("--batch-size") + 1] == "3"
