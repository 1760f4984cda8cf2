"""Z-Image, Qwen-Image and FLUX.2 Klein jobs end to end, with FLUX.1's guarantees: a job with
a LoRA named by a prompt tag runs through the client and the runner on a transformer-only
checkpoint, its PNG names the LoRA, the model's hash and the family's fields, and re-submitted
from that PNG it gives the same pixels; A1111 weights and BREAK are read as plain words with a
warning naming the family's encoder; what the family lacks is refused at submit, naming it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lorafleet.common.catalog.checkpoints import short_hash
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.tiny import make_demo_loras, make_tiny_model
from tests.producer.test_client import queued_messages
from tests.worker.conftest import dropped_in
from tests.worker.test_flow_checkpoints import write
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

FAMILIES = ("zimage", "qwenimage", "flux2")
JOB = {"prompt": "a lighthouse at night", "width": 64, "height": 64, "steps": 2, "seed": 7, "cfg_scale": 2.0}


def folder_name(family: str) -> str:
    return f"tiny-{family}"


def file_name(family: str) -> str:
    """The family's transformer as a single-file checkpoint (as ComfyUI's downloads are)."""
    return f"{family}-transformer"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per family: its tiny folder, its demo LoRAs and its transformer written as one file."""
    root = tmp_path_factory.mktemp("flow-family-jobs")
    out = {}
    for family in FAMILIES:
        folder = make_tiny_model(root / folder_name(family), family=family)
        loras = make_demo_loras(folder, root / f"{family}-loras")
        checkpoint = write(folder, root / f"{file_name(family)}.safetensors", family)
        out[family] = (folder, loras, checkpoint)
    return out


@pytest.fixture
def settings(settings, built, family) -> Settings:  # conftest's, with this family
    folder, loras, checkpoint = built[family]
    return dropped_in(
        settings,
        models=[folder],
        loras=loras,
        checkpoints=[checkpoint],
        checkpoint_configs={family: str(folder)},  # the file's text encoder, tokenizer and VAE
    )


def submit_and_run(client, runner, job):  # noqa: F811
    handle = client.submit(job)
    runner.run(handle.job_id)
    return client.get(handle.job_id)


def png(record, runner) -> bytes:
    return runner.storage.get(record.images[0].key)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def plain_words_warning(family: str) -> str:
    label = Family(family).traits.label
    return (
        f"prompt: A1111 weights, brackets and BREAK mean nothing to {label}'s LLM text encoder; "
        "its plain words are used"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tagged_lora_job_on_a_checkpoint_writes_a_png_that_regenerates_pixel_for_pixel(
    family,
    settings,
    client,  # noqa: F811
    runner,
    tmp_path,
):
    from sd_parsers import ParserManager

    lora = f"{family}-kohya"
    model = file_name(family)
    prompt = f"a lighthouse at night <lora:{lora}:0.8>"
    record = submit_and_run(
        client, runner, JOB | {"model": model, "prompt": prompt, "negative_prompt": "fog"}
    )
    assert record.status is JobStatus.succeeded, record.error
    info = LoraCatalog(settings.lora_dir).get(lora)
    [spec] = record.job.loras
    assert (spec.name, spec.weight, spec.sha256) == (lora, 0.8, info.sha256)
    assert (record.job.sampler.value, record.job.guidance, record.job.clip_skip) == ("euler", None, 1)
    assert not any("plain words" in w for w in record.warnings)  # a LoRA tag is no A1111 weight

    data = png(record, runner)
    text = Image.open(io.BytesIO(data)).text["parameters"]
    parsed = parse_parameters(text)
    assert parsed.prompt == f"a lighthouse at night <lora:{lora}:0.8>" and parsed.negative_prompt == "fog"
    assert parsed.lora_hashes == {lora: info.short_hash}
    fields = parsed.fields
    assert fields["Model"] == model and fields["Module 1"] == folder_name(family)  # Forge's: the base
    assert fields["Model hash"] == short_hash(settings.checkpoints_dir / f"{model}.safetensors")
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "2",
        "Euler",
        "2",
        "7",
        "64x64",
    )
    # no field the family lacks: no schedule, no distilled guidance, no clip skip
    assert not {"Schedule type", "Distilled CFG Scale", "Clip skip"} & set(fields)
    assert parsed.ignored == []
    theirs = ParserManager().parse(io.BytesIO(data))
    [sampler] = theirs.samplers
    assert sampler.name == "Euler" and sampler.model.name == model

    path = tmp_path / f"{family}.png"
    path.write_bytes(data)
    job = client.job_from_png(path)
    assert (job.model, job.steps, job.cfg_scale, job.seed, job.width) == (model, 2, 2.0, 7, 64)
    again = submit_and_run(client, runner, job)
    assert again.status is JobStatus.succeeded, again.error
    assert [(s.name, s.weight, s.sha256) for s in again.job.loras] == [(lora, 0.8, info.sha256)]
    assert np.array_equal(decoded(png(again, runner)), decoded(data))
    # the LoRA is in the pixels: the same job without it draws another image
    bare = submit_and_run(client, runner, JOB | {"model": model, "negative_prompt": "fog"})
    assert bare.status is JobStatus.succeeded, bare.error
    assert not np.array_equal(decoded(png(bare, runner)), decoded(data))


@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_weights_and_break_are_read_as_plain_words_with_a_warning_naming_the_encoder(
    family,
    settings,
    client,  # noqa: F811
    runner,
):
    model = folder_name(family)
    weighted = submit_and_run(
        client, runner, JOB | {"model": model, "prompt": "a (lighthouse:1.3) BREAK at night"}
    )
    assert weighted.status is JobStatus.succeeded, weighted.error
    assert plain_words_warning(family) in weighted.warnings, weighted.warnings
    assert weighted.job.prompt == "a (lighthouse:1.3) BREAK at night"  # kept as given
    plain = submit_and_run(client, runner, JOB | {"model": model})
    assert plain.status is JobStatus.succeeded, plain.error
    assert not any("plain words" in w for w in plain.warnings)
    # "its plain words are used": the very pixels of the prompt written without them
    assert np.array_equal(decoded(png(weighted, runner)), decoded(png(plain, runner)))
    other = submit_and_run(client, runner, JOB | {"model": model, "prompt": "a red castle in the snow"})
    assert not np.array_equal(decoded(png(other, runner)), decoded(png(plain, runner)))  # words matter


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"lcm": True}, "lcm", "for which there is no LCM-LoRA"),
        (
            {"sampler": "dpmpp_2m_karras"},
            "sampler",
            "which samples with its own flow-match Euler scheduler, not dpmpp_2m_karras",
        ),
        ({"clip_skip": 2}, "clip_skip", "whose text encoder is not read by layer"),
    ],
)
def test_what_the_family_lacks_is_refused_at_submit_naming_it_and_nothing_is_queued(
    family,
    settings,
    client,  # noqa: F811
    fields,
    field,
    words,
):
    model = folder_name(family)
    with pytest.raises(JobRejected) as caught:
        client.submit(JOB | {"model": model} | fields)
    label = Family(family).traits.label
    assert caught.value.field == field
    assert f"model {model!r} is {label}, {words}" in caught.value.reason
    assert queued_messages(client, model) == []
    assert client.redis.keys("lorafleet:job:*") == []
