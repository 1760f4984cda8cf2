"""A1111's hires fix on FLUX.1, Qwen-Image and Z-Image with pixel upscalers: the job's first pass,
upscaled in pixels and sampled again through the family's own image-to-image pipeline, gives the
image of those two passes written out with diffusers' pipelines, on a schedule stretched so that
the flow pipeline runs exactly the Hires steps; the PNG regenerates it. Latent upscalers (the
latents are packed patches) and FLUX.2 Klein (no image-to-image pipeline) are refused at submit."""

# ruff: noqa: F811  (client, folders and settings are fixtures imported from other test modules)

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from lorafleet.common.fleet import events
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.hires import image_steps, stretched_steps
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.common.schema.jobs import GenerationJob, JobStatus
from lorafleet.worker.run import runner as runner_module
from lorafleet.worker.tiny import make_tiny_upscaler
from tests.worker.test_flow_images_in import JOB, folders, settings  # noqa: F401
from tests.worker.test_flux1 import expected_deltas, merged_reference
from tests.worker.test_images_in import decoded
from tests.worker.test_runner import client  # noqa: F401
from tests.worker.test_upscalers import published_upscale

EXTRA = {
    "flux1": {"guidance_scale": 3.5},
    "qwenimage": {"true_cfg_scale": 1.0},
    "zimage": {"guidance_scale": 0.0},
}
"""Each family's call with the job's guidance (CFG 1: off; FLUX.1's distilled guidance 3.5)."""


def hires_job(client, runner, family: str, **fields):
    handle = client.submit(
        JOB | {"model": f"tiny-{family}", "hr_scale": 1.5, "hr_upscaler": "Lanczos"} | fields
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    return record, runner.storage.get(record.images[0].key)


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.resize(size, Image.Resampling.LANCZOS)


def two_passes(pipe, family: str, strength: float, steps: int, upscale=lanczos) -> np.ndarray:
    """The hires fix written out with diffusers: text to image (PIL), ``upscale`` (Lanczos), the
    family's image-to-image on a schedule of ``steps``, one generator for both."""
    from diffusers import AutoPipelineForImage2Image

    if not isinstance(pipe, DiffusionPipeline):  # its folder
        pipe = DiffusionPipeline.from_pretrained(str(pipe), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(JOB["seed"])
    common = {"prompt": JOB["prompt"], "generator": generator} | EXTRA[family]
    first = pipe(**common, num_inference_steps=JOB["steps"], width=64, height=64, output_type="pil")
    image = upscale(first.images[0], (96, 96))
    second = AutoPipelineForImage2Image.from_pipe(pipe)
    second.set_progress_bar_config(disable=True)
    out = second(**common, image=image, strength=strength, num_inference_steps=steps, width=96, height=96)
    return np.asarray(out.images[0].convert("RGB")).astype(int)


@pytest.mark.parametrize("family", ["flux1", "qwenimage", "zimage"])
def test_a_flow_hires_job_gives_the_two_passes_of_diffusers_own_pipelines(client, runner, folders, family):
    _, built = folders
    record, png = hires_job(client, runner, family, hr_strength=0.6)
    assert (record.images[0].width, record.images[0].height) == (96, 96)
    assert record.progress.total == 4 + 4  # the first pass's 4, then exactly the hires pass's 4
    # 4 Hires steps at 0.6: a schedule of 6 (6 - int(6 - 3.6) = 4); SD's stretch, 7, would run 5
    want = two_passes(built[family], family, 0.6, 6)
    assert np.abs(decoded(png) - want).max() <= 2


def test_a_flux_hires_job_with_a_lora_runs_both_passes_with_it(client, runner, folders):
    root, built = folders
    _, png = hires_job(
        client, runner, "flux1", hr_strength=0.6, loras=[{"name": "flux1-peft", "weight": 0.8}]
    )
    reference = DiffusionPipeline.from_pretrained(str(built["flux1"]), local_files_only=True)
    state = load_file(str(root / "flux1-loras" / "flux1-peft.safetensors"))
    merged_reference(reference, reference, [(expected_deltas(reference, state, "peft"), 0.8)])
    want = two_passes(reference, "flux1", 0.6, 6)
    assert np.abs(decoded(png) - want).max() <= 2
    assert np.abs(two_passes(built["flux1"], "flux1", 0.6, 6) - want).max() > 2  # the LoRA shows


def test_a_flow_hires_job_through_an_esrgan_upscaler_gives_the_two_passes(client, runner, folders, settings):
    _, built = folders
    make_tiny_upscaler(settings.upscaler_dir / "4x-tiny.safetensors", layout="basicsr")
    record, png = hires_job(client, runner, "zimage", hr_upscaler="4x-tiny", hr_strength=0.6)
    assert (record.images[0].width, record.images[0].height) == (96, 96)
    state = load_file(
        str(make_tiny_upscaler(settings.upscaler_dir / "as-published.safetensors", layout="esrgan-old"))
    )
    want = two_passes(built["zimage"], "zimage", 0.6, 6, partial(published_upscale, state))
    assert np.abs(decoded(png) - want).max() <= 2


def test_the_flow_hires_pass_runs_exactly_its_steps():
    """FLUX.1's, Qwen-Image's and Z-Image's image-to-image skip int(total - total x strength) steps."""
    for steps in range(1, 61):
        for strength in (0.05, 0.1, 0.25, 0.3, 0.33, 0.35, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99, 1.0):
            job = GenerationJob(
                model="m", prompt="p", steps=10, hr_scale=2, hr_steps=steps, hr_strength=strength
            )
            total = stretched_steps(job, flow=True)
            assert image_steps(total, strength, flow=True) == steps, (steps, strength, total)


def test_a_flow_hires_jobs_progress_ends_at_its_total(client, runner, monkeypatch):
    monkeypatch.setattr(runner_module, "PROGRESS_SECONDS", 0.0)  # every step written, none skipped
    after = events.tail(client.redis)
    handle = client.submit(
        JOB
        | {"model": "tiny-qwenimage", "hr_scale": 1.5, "hr_upscaler": "Nearest", "hr_steps": 3}
        | {"hr_strength": 0.35, "num_images": 2}
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    running = [e for e in events.read_events(client.redis, after, block=0) if e.job_id == handle.job_id]
    running = [e for e in running if e.status == "running"]
    assert all(e.step <= e.total for e in running), [(e.step, e.total) for e in running]
    assert max(e.step for e in running) == running[-1].total == record.progress.total == (4 + 3) * 2


def test_the_flow_hires_png_says_it_as_a1111_and_regenerates(client, runner, tmp_path):
    record, png = hires_job(client, runner, "flux1", hr_steps=3, hr_strength=0.5)
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert (fields["Size"], fields["Hires upscale"], fields["Hires steps"]) == ("64x64", "1.5", "3")
    assert (fields["Hires upscaler"], fields["Denoising strength"]) == ("Lanczos", "0.5")
    path = tmp_path / "hires.png"
    path.write_bytes(png)
    again = client.submit(client.job_from_png(path))
    runner.run(again.job_id)
    redone = client.get(again.job_id)
    assert redone.status is JobStatus.succeeded, redone.error
    assert (redone.job.hr_scale, redone.job.hr_upscaler, redone.job.hr_steps) == (1.5, "Lanczos", 3)
    assert np.array_equal(decoded(runner.storage.get(redone.images[0].key)), decoded(png))


def test_what_the_flow_hires_fix_cannot_do_is_refused_naming_the_field(client):
    queued = client.redis.dbsize()
    cases = [
        (
            {"model": "tiny-flux1", "hr_upscaler": "Latent"},
            "hr_upscaler",
            "packs its latents into 2x2 patches",
        ),
        (
            {"model": "tiny-zimage", "hr_upscaler": "Latent (bicubic)"},
            "hr_upscaler",
            "Lanczos, Nearest or an ESRGAN-family model (leave hr_upscaler out: Lanczos",
        ),
        ({"model": "tiny-flux2", "hr_upscaler": "Lanczos"}, "hr_scale", "FLUX.2 Klein"),
        (
            {"model": "tiny-qwenimage", "hr_upscaler": "Lanczos", "hr_scale": 1.2},
            "hr_scale",
            "multiple of 16",
        ),
    ]
    for fields, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | {"hr_scale": 1.5} | fields)
        assert refused.value.field == field and words in str(refused.value), (fields, refused.value)
    assert client.redis.dbsize() == queued  # nothing queued


def test_a_flow_hires_job_that_names_no_upscaler_upscales_with_lanczos(client):
    """A1111's default upscaler (Latent) cannot stretch a flow family's latents: a job that
    names none gets Lanczos there, and an SD job keeps A1111's default."""
    flux = client.submit(JOB | {"model": "tiny-flux1", "hr_scale": 1.5}).job
    assert flux.hr_upscaler == "Lanczos"
    sd = client.submit({"model": "tiny-sd15", "prompt": "p", "hr_scale": 1.5}).job
    assert sd.hr_upscaler == "Latent"


def test_a_flow_hires_job_the_producer_could_not_check_fails_at_the_worker(folders):
    """A hub id or a folder only the workers see has no family at submit: the worker refuses."""
    from lorafleet.common.schema.errors import JobFailed
    from lorafleet.worker.run import flow

    _, built = folders
    base = {
        "model": "owner/flow",
        "prompt": "x",
        "width": 64,
        "height": 64,
        "hr_scale": 1.5,
        "job_id": "j1",
        "sampler": "euler",
    }
    cases = [
        ("flux1", {"hr_upscaler": "Latent"}, "latent upscaler 'Latent' for the hires fix"),
        ("zimage", {"hr_upscaler": "Lanczos", "hr_scale": 1.2}, "hires fix at 72x72"),
        ("flux2", {"hr_upscaler": "Lanczos"}, "is FLUX.2 Klein, which has no hires fix"),
    ]
    for family, fields, words in cases:
        pipe = DiffusionPipeline.from_pretrained(str(built[family]), local_files_only=True)
        with pytest.raises(JobFailed, match="register it with its family") as failed:
            flow.check(pipe, GenerationJob(**base | fields))
        assert words in str(failed.value) and failed.value.job_id == "j1", failed.value
    zimage = DiffusionPipeline.from_pretrained(str(built["zimage"]), local_files_only=True)
    flow.check(zimage, GenerationJob(**base | {"hr_upscaler": "Lanczos"}))  # 96x96 in pixels: runs
