"""A1111's hires fix: a job sampled at its size, upscaled (in latents or pixels) and sampled again
gives the image of the same two passes through diffusers' own pipelines (the LoRA merged here in
float64); the PNG says it as A1111 writes it, so --from-png regenerates it, and an A1111 PNG's
hires settings are read back."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from tests.worker.test_images_in import JOB, decoded, reference, submitted  # noqa: F401
from tests.worker.test_runner import client  # noqa: F401


def two_passes(pipe, upscaler: str, scale: float = 1.5, strength: float = 0.6, steps: int | None = None):
    """The hires fix written out with diffusers: txt2img, upscale, img2img, one generator."""
    from diffusers import AutoPipelineForImage2Image, EulerDiscreteScheduler

    generator = torch.Generator("cpu").manual_seed(JOB["seed"])
    common = dict(prompt=JOB["prompt"], guidance_scale=7.0, generator=generator)
    latent = upscaler.startswith("Latent")
    first = pipe(
        **common,
        num_inference_steps=JOB["steps"],
        width=64,
        height=64,
        output_type="latent" if latent else "pil",
    )
    size = (int(64 * scale) // 8 * 8, int(64 * scale) // 8 * 8)
    if latent:
        image = torch.nn.functional.interpolate(
            first.images,
            size=(size[1] // pipe.vae_scale_factor, size[0] // pipe.vae_scale_factor),
            mode="bilinear",
            antialias=False,
        )
    else:
        image = first.images[0].resize(size, Image.Resampling.LANCZOS)
    second = AutoPipelineForImage2Image.from_pipe(pipe)
    second.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    second.set_progress_bar_config(disable=True)
    wanted = steps or JOB["steps"]  # A1111 runs exactly its Hires steps: the schedule stretched
    out = second(**common, image=image, strength=strength, num_inference_steps=math.ceil(wanted / strength))
    return np.asarray(out.images[0].convert("RGB")).astype(int)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_hires_job_gives_the_two_passes_of_diffusers_own_pipelines(client, runner, reference, upscaler):
    record, png = submitted(
        client, runner, width=64, height=64, hr_scale=1.5, hr_upscaler=upscaler, hr_strength=0.6
    )
    assert (record.images[0].width, record.images[0].height) == (96, 96)
    assert record.progress.total == 8 + 8  # the first pass's steps, then the hires pass's 8 (A1111)
    want = two_passes(reference, upscaler)
    assert np.abs(decoded(png) - want).max() <= 2


def test_the_png_says_the_hires_fix_as_a1111_and_regenerates(client, runner, tmp_path):
    record, png = submitted(client, runner, width=64, height=64, hr_scale=1.5, hr_steps=6, hr_strength=0.5)
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert (fields["Size"], fields["Hires upscale"], fields["Hires steps"]) == ("64x64", "1.5", "6")
    assert (fields["Hires upscaler"], fields["Denoising strength"]) == ("Latent", "0.5")
    path = tmp_path / "hires.png"
    path.write_bytes(png)
    again = client.submit(client.job_from_png(path))
    runner.run(again.job_id)
    redone = client.get(again.job_id)
    assert (redone.job.hr_scale, redone.job.hr_steps, redone.job.hr_strength) == (1.5, 6, 0.5)
    assert np.array_equal(decoded(runner.storage.get(redone.images[0].key)), decoded(png))


def test_what_the_hires_fix_cannot_do_is_refused_naming_the_field(client):
    cases = [
        ({"hr_scale": 1.5, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "unknown upscaler 'R-ESRGAN 4x+'"),
        ({"hr_steps": 10}, "hr_steps", "only with hr_scale"),
        ({"hr_scale": 4.0, "width": 1024, "height": 512}, "hr_scale", "4096x2048"),
        ({"hr_scale": 9}, "hr_scale", "4"),
        (
            {"hr_scale": 1.5, "ip_adapter": {"model": "ip", "images": ["sha256:" + "3" * 64]}},
            "hr_scale",
            "not with init_image, controlnets or ip_adapter",
        ),
    ]
    for fields, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | fields)
        assert refused.value.field == field and words in str(refused.value), (fields, refused.value)


def test_the_hires_pass_runs_exactly_its_steps_as_a1111():
    """diffusers' image-to-image runs min(int(total x strength), total) of a schedule of total."""
    from lorafleet.common.schema.hires import stretched_steps
    from lorafleet.common.schema.jobs import GenerationJob

    for steps in range(1, 61):
        for strength in (0.05, 0.1, 0.25, 0.3, 0.33, 0.35, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99, 1.0):
            job = GenerationJob(
                model="m", prompt="p", steps=10, hr_scale=2, hr_steps=steps, hr_strength=strength
            )
            total = stretched_steps(job)
            assert min(int(total * strength), total) == steps, (steps, strength, total)


def test_a_strength_that_runs_no_step_is_refused(client):
    from tests.worker.test_images_in import photo

    with pytest.raises(JobRejected) as refused:
        client.submit(JOB | {"steps": 2, "init_image": client.upload_image(photo(20)), "strength": 0.3})
    assert refused.value.field == "strength" and "at least 0.5" in str(refused.value)
