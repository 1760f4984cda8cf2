"""Regenerating from a PNG: lorafleet's own reproduce pixel for pixel; A1111's, Forge's and
InvokeAI's are read into the job they describe, LoRAs and models matched by name or hash."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from lorafleet.common.catalog.lora_files import sha256_file
from lorafleet.common.schema.errors import BadArgument, JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer.cli import app
from lorafleet.worker.checkpoint_format import write_single_file
from tests.conftest import TINY, TINY_XL
from tests.worker.test_runner import client, pixels, run  # noqa: F401  (client is a fixture)


def saved_png(runner, record, path):
    path.write_bytes(runner.storage.get(record.images[0].key))
    return path


def a1111_png(path, parameters: str):
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {
            "prompt": "a (lighthouse:1.3) at night, [red] sea <lora:watercolor:0.2:0.9>",
            "negative_prompt": "dark, (sketch:0.8)",
            "sampler": "dpmpp_2m_karras",
            "steps": 3,
            "cfg_scale": 6.5,
            "clip_skip": 2,
            "loras": [{"name": "ink-sketch", "weight": 0.123456789}],
        },
        {"prompt": "a lighthouse", "lcm": True},
        {"model": TINY_XL, "prompt": "a city BREAK neon light", "sampler": "euler_trailing", "steps": 2},
        {"prompt": "a lighthouse+ at (night)1.2", "prompt_syntax": "compel", "steps": 2},
    ],
)
def test_a_lorafleet_png_regenerates_pixel_for_pixel(client, runner, tmp_path, fields):  # noqa: F811
    first = run(client, runner, **({"seed": 99, "num_images": 2} | fields))
    assert first.status is JobStatus.succeeded, first.error
    second_image = tmp_path / "second.png"
    second_image.write_bytes(runner.storage.get(first.images[1].key))  # image 1: seed 100
    job = client.job_from_png(second_image)
    assert job.seed == 100 and job.model == first.job.model
    assert job.batch_size == first.timings.batch_size  # the rows of its call, read back
    again = client.submit(job)
    assert runner.run(again.job_id) is JobStatus.succeeded
    regenerated = client.get(again.job_id)
    assert [(s.name, s.weight, s.text_encoder_weight) for s in regenerated.job.loras] == [
        (s.name, s.weight, s.text_encoder_weight) for s in first.job.loras
    ]
    assert pixels(regenerated, runner) == _pixels_of(runner, first.images[1].key)


def _pixels_of(runner, key) -> bytes:
    import io

    return Image.open(io.BytesIO(runner.storage.get(key))).convert("RGB").tobytes()


def test_overrides_replace_the_pngs_values(client, runner, tmp_path):  # noqa: F811
    first = run(client, runner, prompt="a lighthouse <lora:watercolor:0.8>", steps=3)
    path = saved_png(runner, first, tmp_path / "a.png")
    job = client.job_from_png(path, seed=5, steps=2)
    assert (job.seed, job.steps) == (5, 2)
    assert job.prompt == "a lighthouse <lora:watercolor:0.8>"


def test_an_a1111_png_is_read_with_loras_and_model_matched_by_hash(client, settings, tmp_path):  # noqa: F811
    # A Civitai checkpoint dropped in under another name than the PNG's, and a LoRA renamed.
    folder = settings.models_dir / TINY
    checkpoint = write_single_file(folder, settings.checkpoints_dir / "my-checkpoint.safetensors", "sd15")
    lora_dir = settings.lora_dir
    shutil.copy(lora_dir / "watercolor.safetensors", lora_dir / "wc-renamed.safetensors")
    (lora_dir / "watercolor.safetensors").unlink()
    tensor_hash = sha256_file(lora_dir / "wc-renamed.safetensors", skip_header=True)[:12]
    model_hash = sha256_file(checkpoint)[:10]
    path = a1111_png(
        tmp_path / "a1111.png",
        "masterpiece, (a lighthouse:1.2),\nat night <lora:watercolorStyle_v2:0.7>\n"
        "Negative prompt: lowres, bad anatomy\nBREAK sketch\n"
        f"Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3141592653, "
        f"Size: 512x768, Model hash: {model_hash}, Model: realisticVision_v51, Denoising strength: 0.4, "
        f'Clip skip: 2, Hires upscale: 2, Lora hashes: "watercolorStyle_v2: {tensor_hash}", '
        f'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1',
    )
    job = client.job_from_png(path)
    assert job.model == "my-checkpoint"
    assert job.prompt == "masterpiece, (a lighthouse:1.2),\nat night <lora:wc-renamed:0.7>"
    assert job.negative_prompt == "lowres, bad anatomy\nBREAK sketch"
    assert (job.steps, job.cfg_scale, job.seed, job.width, job.height, job.clip_skip) == (
        20,
        7.5,
        3141592653,
        512,
        768,
        2,
    )
    assert job.sampler.value == "dpmpp_2m_karras"
    resolved = client.submit(job).job
    assert [(s.name, s.weight) for s in resolved.loras] == [("wc-renamed", 0.7)]


def test_the_ignored_fields_are_named(settings, tmp_path):
    from lorafleet.common.schema.infotext import read_png

    path = a1111_png(
        tmp_path / "x.png",
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Hires upscale: 2, "
        "Batch size: 4",
    )
    assert read_png(path).ignored == ["Batch size"]  # A1111's images per call; its hires fix is read
    fields = read_png(path).job_fields()
    assert "batch_size" not in fields and (fields["hr_scale"], fields["hr_upscaler"]) == (2.0, "Latent")


@pytest.mark.parametrize(
    "parameters, field, words",
    [
        (
            "a cat <lora:missing:0.5>\nSteps: 2, Sampler: Euler, Seed: 1, Model: tiny-sd15, "
            'Lora hashes: "missing: 0123456789ab"',
            "prompt",
            "LoRA 'missing' (hash 0123456789ab) is not installed",
        ),
        (
            "a cat\nSteps: 2, Sampler: Euler, Seed: 1, Model hash: 0123456789, Model: someModel_v1",
            "model",
            "model 'someModel_v1' (hash 0123456789) is not installed here",
        ),
        ("a cat\nSteps: 2, Sampler: Heun, Seed: 1, Model: tiny-sd15", "x.png: Sampler", "'Heun'"),
        ("a cat\nSteps: many, Sampler: Euler, Seed: 1, Model: tiny-sd15", "x.png: Steps", "not a whole"),
        ("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: big, Model: tiny-sd15", "x.png: Size", "WIDTHx"),
    ],
)
def test_what_cannot_be_reproduced_is_refused_naming_it(client, tmp_path, parameters, field, words):  # noqa: F811
    path = a1111_png(tmp_path / "x.png", parameters)
    with pytest.raises((JobRejected, BadArgument)) as caught:
        client.job_from_png(path)
    assert caught.value.field == field
    assert words in str(caught.value), str(caught.value)


def test_an_image_without_parameters_says_so(client, tmp_path):  # noqa: F811
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(BadArgument, match="carries no generation parameters"):
        client.job_from_png(path)


def test_invokeai_metadata_is_read_with_compel_syntax(client, tmp_path):  # noqa: F811
    metadata = {
        "positive_prompt": "a lighthouse+ at (night)1.2",
        "negative_prompt": "dark",
        "width": 64,
        "height": 64,
        "seed": 77,
        "steps": 3,
        "cfg_scale": 5,
        "scheduler": "dpmpp_2m_k",
        "clip_skip": 0,
        "cfg_rescale_multiplier": 0.7,
        "model": {"key": "abc", "hash": "blake3:ffff", "name": TINY, "base": "sd-1"},
        "loras": [{"model": {"key": "k", "name": "watercolor", "base": "sd-1"}, "weight": 0.6}],
    }
    info = PngInfo()
    info.add_text("invokeai_metadata", json.dumps(metadata))
    path = tmp_path / "invoke.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    job = client.job_from_png(path)
    assert job.prompt_syntax.value == "compel" and job.prompt == "a lighthouse+ at (night)1.2"
    assert job.sampler.value == "dpmpp_2m_karras" and (job.steps, job.seed, job.cfg_scale) == (3, 77, 5)
    assert [(s.name, s.weight) for s in job.loras] == [("watercolor", 0.6)]
    assert job.clip_skip == 1  # InvokeAI counts skipped layers: its 0 is A1111's 1
    notes = reader(client).read(path).notes
    assert notes == ["invoke.png: cfg_rescale_multiplier is not reproduced by lorafleet"]


def test_the_cli_regenerates_a_png_with_overrides(client, runner, settings, tmp_path, monkeypatch):  # noqa: F811
    first = run(client, runner, prompt="a lighthouse <lora:watercolor:0.8>", steps=3)
    path = saved_png(runner, first, tmp_path / "a.png")
    for key, value in settings.model_dump(mode="json", exclude_none=True).items():
        if isinstance(value, (str, int, float, bool)):
            monkeypatch.setenv(f"LORAFLEET_{key.upper()}", str(value))
    result = CliRunner().invoke(app, ["submit", "--from-png", str(path), "--seed", "8", "--json"])
    assert result.exit_code == 0, result.output
    [queued] = json.loads(result.output)
    record = client.get(queued["job_id"])
    assert record.job.seed == 8 and record.job.steps == 3 and record.job.model == TINY
    assert [(s.name, s.weight) for s in record.job.loras] == [("watercolor", 0.8)]
    result = CliRunner().invoke(
        app, ["submit", "--from-png", str(path), "--lora", "watercolor:0.3", "--lcm", "--json"]
    )
    assert result.exit_code == 0, result.output
    record = client.get(json.loads(result.output)[0]["job_id"])
    assert [(s.name, s.weight) for s in record.job.loras] == [("watercolor", 0.3), ("lcm-lora-sd15", 0.35)]
    assert (record.job.sampler.value, record.job.steps, record.job.cfg_scale) == ("lcm", 4, 1)


def test_what_lorafleet_writes_reads_back_in_sd_parsers(client, runner, tmp_path):  # noqa: F811
    from sd_parsers import ParserManager

    record = run(
        client,
        runner,
        prompt='a "quoted", lighthouse: at night <lora:watercolor:0.8>',
        negative_prompt="dark, sketch",
        sampler="dpmpp_2m_sde_karras",
        steps=3,
        cfg_scale=6.5,
        clip_skip=2,
    )
    path = saved_png(runner, record, tmp_path / "a.png")
    text = Image.open(path).text["parameters"]
    ours = parse_parameters(text)
    assert ours.prompt == 'a "quoted", lighthouse: at night <lora:watercolor:0.8>'
    assert ours.fields["Sampler"] == "DPM++ 2M SDE" and ours.fields["Schedule type"] == "Karras"
    theirs = ParserManager().parse(str(path))
    assert theirs is not None
    [prompt] = theirs.prompts
    [negative] = theirs.negative_prompts
    assert prompt.value == ours.prompt and negative.value == "dark, sketch"
    [sampler] = theirs.samplers
    assert (sampler.name, sampler.parameters["scheduler"]) == ("DPM++ 2M SDE", "Karras")
    assert sampler.model.name == "tiny-sd15"
    wanted = {"steps": "3", "cfg_scale": "6.5", "seed": str(record.images[0].seed)}
    assert {key: sampler.parameters[key] for key in wanted} == wanted
    assert theirs.metadata["Size"] == "64x64" and theirs.metadata["Clip skip"] == "2"


def reader(client):  # noqa: F811
    from lorafleet.producer.png_jobs import PngReader

    return PngReader(client.resolver.models, client.resolver.loras)


def test_an_a1111_clip_skip_on_sdxl_is_dropped_as_a1111_ignores_it(client, tmp_path):  # noqa: F811
    path = a1111_png(
        tmp_path / "xl.png",
        f"a cat\nSteps: 2, Sampler: Euler, Seed: 1, Model: {TINY_XL}, Clip skip: 2, Version: v1.10.1",
    )
    read = reader(client).read(path)
    assert "clip_skip" not in read.fields
    assert any("Clip skip" in note and "SDXL" in note for note in read.notes)


def test_overriding_the_prompt_keeps_the_pngs_loras_and_a_listed_lora_replaces_one(client, tmp_path):  # noqa: F811
    path = a1111_png(
        tmp_path / "a.png",
        "a cat <lora:watercolor:0.8> <lora:ink-sketch:0.5>\nSteps: 2, Sampler: Euler, Seed: 1, Model: tiny-sd15",
    )
    job = client.job_from_png(path, prompt="a dog")
    assert job.prompt == "a dog"
    assert [(s.name, s.weight) for s in job.loras] == [("watercolor", 0.8), ("ink-sketch", 0.5)]
    job = client.job_from_png(path, loras=[{"name": "watercolor", "weight": 0.3}])
    assert job.prompt == "a cat <lora:ink-sketch:0.5>"
    assert [(s.name, s.weight) for s in client.submit(job).job.loras] == [
        ("watercolor", 0.3),
        ("ink-sketch", 0.5),
    ]


def test_a_hash_too_short_to_name_a_file_matches_nothing(client, tmp_path):  # noqa: F811
    path = a1111_png(
        tmp_path / "a.png",
        'a cat <lora:renamed:0.8>\nSteps: 2, Sampler: Euler, Seed: 1, Model: tiny-sd15, Lora hashes: "renamed: a"',
    )
    with pytest.raises(JobRejected, match="'renamed' .* is not installed"):
        client.job_from_png(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: _bomb_png(), "cannot read"),
        (lambda: _png_with_text("invokeai_metadata", "[" * 200_000), "carries no generation parameters"),
        (lambda: _png_with_text("parameters", "a" * 70_000 + ": 1, b: 2, c: 3"), "longer than"),
    ],
)
def test_hostile_images_are_refused_with_a_message(client, tmp_path, make, words):  # noqa: F811
    path = tmp_path / "hostile.png"
    path.write_bytes(make())
    with pytest.raises(BadArgument, match=words):
        client.job_from_png(path)


def _bomb_png() -> bytes:
    import struct

    header = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def _png_with_text(key: str, value: str) -> bytes:
    import io

    info = PngInfo()
    info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_invokeai_metadata_of_the_wrong_shape_is_read_as_far_as_it_goes(client, tmp_path):  # noqa: F811
    path = tmp_path / "odd.png"
    path.write_bytes(
        _png_with_text("invokeai_metadata", json.dumps({"positive_prompt": "a cat", "loras": 5, "model": 3}))
    )
    job = client.job_from_png(path, model=TINY)
    assert job.prompt == "a cat" and job.loras == []


def test_a_lorafleet_png_from_before_side_paths_regenerates_merged():
    """Its LoRAs ran merged (the only mode then): under a fleet whose default is side, the
    job read back still says merge; a PNG that names its mode keeps it."""
    from lorafleet.common.schema.infotext import parse_parameters

    fields = 'Steps: 2, Sampler: Euler, Seed: 1, Model: tiny-sd15, Lora hashes: "watercolor: 0123456789ab"'
    old = parse_parameters(f"a cat <lora:watercolor:0.5>\n{fields}, Version: lorafleet 0.1.0")
    assert old.job_fields()["lora_mode"] == "merge"
    new = parse_parameters(
        f"a cat <lora:watercolor:0.5>\n{fields}, LoRA mode: side, Version: lorafleet 0.1.0"
    )
    assert new.job_fields()["lora_mode"] == "side"
    foreign = parse_parameters(f"a cat <lora:watercolor:0.5>\n{fields}, LoRA mode: side, Version: v1.10.1")
    assert "lora_mode" not in foreign.job_fields() and "LoRA mode" in foreign.ignored
