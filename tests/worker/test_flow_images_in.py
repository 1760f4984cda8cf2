"""Images in on the flow families whose diffusers pipelines take them: an img2img job on FLUX.1
(with a LoRA), Qwen-Image and Z-Image, and inpainting on FLUX.1, give the image of diffusers'
own image-to-image and inpainting pipelines from the same inputs and seed; FLUX.2 Klein, which
has none, refuses an init image naming the family."""

# ruff: noqa: F811  (client is a fixture imported from another test module)

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from lorafleet.common.fleet import events
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.run import runner as runner_module
from lorafleet.worker.tiny import make_demo_loras, make_tiny_model
from tests.worker.conftest import dropped_in
from tests.worker.test_flux1 import expected_deltas, merged_reference
from tests.worker.test_images_in import decoded, mask, photo
from tests.worker.test_runner import client  # noqa: F401

FAMILIES = ("flux1", "qwenimage", "zimage", "flux2")
JOB = {"prompt": "a lighthouse at night", "width": 64, "height": 64, "steps": 4, "seed": 7, "cfg_scale": 1.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-images-in")
    built = {family: make_tiny_model(root / f"tiny-{family}", family=family) for family in FAMILIES}
    make_demo_loras(built["flux1"], root / "flux1-loras")
    return root, built


@pytest.fixture
def settings(settings, folders) -> Settings:  # conftest's, with the flow models
    root, built = folders
    return dropped_in(
        settings, models=built.values(), loras=[root / "flux1-loras" / "flux1-peft.safetensors"]
    )


def run(client, runner, **fields):
    handle = client.submit(JOB | fields)
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    return decoded(runner.storage.get(record.images[0].key))


def diffusers_image(pipe, init: bytes, strength: float, drawn: bytes | None = None, **extra):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    image = Image.open(io.BytesIO(init)).convert("RGB")
    arguments = (
        dict(
            prompt=JOB["prompt"],
            image=image,
            strength=strength,
            num_inference_steps=JOB["steps"],
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        )
        | extra
    )
    if drawn is None:
        derived = AutoPipelineForImage2Image.from_pipe(pipe)
    else:
        derived = AutoPipelineForInpainting.from_pipe(pipe)
        arguments["mask_image"] = derived.mask_processor.blur(
            Image.open(io.BytesIO(drawn)).convert("L"), blur_factor=4
        )
    derived.set_progress_bar_config(disable=True)
    out = derived(**arguments).images[0]
    if drawn is not None:
        out = derived.image_processor.apply_overlay(arguments["mask_image"], image, out)
    return np.asarray(out.convert("RGB")).astype(int)


def test_a_flux_img2img_job_with_a_lora_gives_diffusers_own_image(client, runner, folders):
    root, built = folders
    init = photo(50)
    got = run(
        client,
        runner,
        model="tiny-flux1",
        init_image=client.upload_image(init),
        strength=0.7,
        loras=[{"name": "flux1-peft", "weight": 0.8}],
    )
    reference = DiffusionPipeline.from_pretrained(str(built["flux1"]), local_files_only=True)
    state = load_file(str(root / "flux1-loras" / "flux1-peft.safetensors"))
    merged_reference(reference, reference, [(expected_deltas(reference, state, "peft"), 0.8)])
    want = diffusers_image(reference, init, 0.7, guidance_scale=3.5)
    assert np.abs(got - want).max() <= 2


@pytest.mark.parametrize("family", ["qwenimage", "zimage"])
def test_qwen_image_and_z_image_img2img_give_diffusers_own_image(client, runner, folders, family):
    _, built = folders
    init = photo(51)
    got = run(client, runner, model=f"tiny-{family}", init_image=client.upload_image(init), strength=0.6)
    reference = DiffusionPipeline.from_pretrained(str(built[family]), local_files_only=True)
    extra = {"guidance_scale": 0.0} if family == "zimage" else {"true_cfg_scale": 1.0}
    want = diffusers_image(reference, init, 0.6, **extra)
    assert np.abs(got - want).max() <= 2


@pytest.mark.parametrize("family", ["flux1", "qwenimage", "zimage"])
def test_a_flow_img2img_jobs_progress_ends_at_its_total_and_never_passes_it(
    client, runner, family, monkeypatch
):
    monkeypatch.setattr(runner_module, "PROGRESS_SECONDS", 0.0)  # every step written, none skipped
    after = events.tail(client.redis)
    # 4 steps at 0.6: these pipelines run 3 of them each image (SD's would run int(4 x 0.6) = 2)
    handle = client.submit(
        JOB
        | {"model": f"tiny-{family}", "init_image": client.upload_image(photo(55)), "strength": 0.6}
        | {"num_images": 2}
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    running = [e for e in events.read_events(client.redis, after, block=0) if e.job_id == handle.job_id]
    running = [e for e in running if e.status == "running"]
    assert all(e.step <= e.total for e in running), [(e.step, e.total) for e in running]
    assert max(e.step for e in running) == running[-1].total == record.progress.total == 6


def test_flux_inpainting_gives_diffusers_own_image(client, runner, folders):
    _, built = folders
    init, drawn = photo(52), mask()
    got = run(
        client,
        runner,
        model="tiny-flux1",
        init_image=client.upload_image(init),
        mask_image=client.upload_image(drawn),
        strength=0.9,
    )
    reference = DiffusionPipeline.from_pretrained(str(built["flux1"]), local_files_only=True)
    want = diffusers_image(reference, init, 0.9, drawn, guidance_scale=3.5)
    assert np.abs(got - want).max() <= 2


def test_flux2_klein_refuses_an_init_image_naming_the_family(client):
    with pytest.raises(JobRejected) as refused:
        client.submit(JOB | {"model": "tiny-flux2", "init_image": client.upload_image(photo(53))})
    assert refused.value.field == "init_image" and "FLUX.2 Klein, which has no image-to-image" in str(
        refused.value
    )


def test_a_flow_jobs_size_from_its_init_image_is_a_multiple_of_16(client):
    ref = client.upload_image(photo(54, size=(100, 72)))
    job = client.submit(JOB | {"model": "tiny-flux1", "init_image": ref, "width": None, "height": None}).job
    assert (job.width, job.height) == (96, 64)
