"""Inpainting models (a 9-channel UNet), diffusers folders and single files: a job on one, with a
LoRA, repaints as diffusers' StableDiffusionInpaintPipeline; text to image is refused at submit,
and fails on the worker for a model only the workers can see."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from tests.worker.test_images_in import (  # noqa: F401  (reference: a fixture)
    JOB,
    LORA,
    decoded,
    diffusers_image,
    mask,
    merge_peft,
    photo,
    reference,
    submitted,
)
from tests.worker.test_runner import client  # noqa: F401  (a fixture)


@pytest.fixture
def inpainting_home(home):
    from lorafleet.worker.tiny import make_tiny_model

    make_tiny_model(home / "models" / "tiny-inpainting", family="sd15-inpainting")
    return home


def test_an_inpainting_model_repaints_as_diffusers_and_refuses_text_to_image(inpainting_home, client, runner):  # noqa: F811
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    init, drawn = photo(60), mask()
    fields = {"model": "tiny-inpainting", "init_image": client.upload_image(init), "strength": 1.0}
    record, png = submitted(client, runner, **fields, mask_image=client.upload_image(drawn))
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(inpainting_home / "models" / "tiny-inpainting"),
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert pipe.unet.config.in_channels == 9
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    merge_peft(
        pipe, load_file(str(inpainting_home / "autoimport" / "lora" / f"{LORA[0]}.safetensors")), LORA[1]
    )
    want = diffusers_image(pipe, "inpaint", init, 1.0, drawn, overlay=True)
    assert np.abs(decoded(png) - want).max() <= 2
    for given, field in (({}, "mask_image"), ({"init_image": None, "strength": None}, "init_image")):
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | fields | given)
        assert refused.value.field == field and "inpainting model (its UNet reads 9 channels)" in str(
            refused.value
        )


def test_an_inpainting_model_only_workers_see_fails_jobs_without_its_inputs(inpainting_home, client, runner):  # noqa: F811

    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.common.schema.family import Family

    on_workers = inpainting_home.parent / "on-the-workers" / "tiny-inpainting"  # not here at submit
    ModelRegistry(client.settings, client.redis).register(
        "remote-inpainting", str(on_workers), family=Family.sd15
    )
    job = JOB | {"model": "remote-inpainting", "width": 64, "height": 64}
    handles = [
        client.submit(job),
        client.submit(job | {"init_image": client.upload_image(photo(62)), "strength": 0.5}),
    ]
    shutil.copytree(inpainting_home / "models" / "tiny-inpainting", on_workers)
    for handle, missing in zip(handles, ("init_image and mask_image", "mask_image")):
        runner.run(handle.job_id)
        record = client.get(handle.job_id)
        assert record.status is JobStatus.failed
        assert "inpainting model (its UNet reads 9 channels)" in record.error, record.error
        assert (
            f"this job has no {missing}" in record.error and "needs init_image and mask_image" in record.error
        )


def test_an_inpainting_checkpoint_file_runs_as_its_folder(inpainting_home, settings, client, runner):  # noqa: F811
    from lorafleet.worker.checkpoint_format import write_single_file

    folder = inpainting_home / "models" / "tiny-inpainting"
    write_single_file(folder, settings.checkpoints_dir / "tiny-inpainting-file.safetensors", "sd15")
    configs = {"sd15-inpainting": str(folder)}  # as LORAFLEET_CHECKPOINT_CONFIGS would say it
    from lorafleet.common.catalog.models import ModelRegistry

    ref = ModelRegistry(settings.model_copy(update={"checkpoint_configs": configs}), client.redis).get(
        "tiny-inpainting-file"
    )
    assert ref.inpainting and ref.config == str(folder)
    init, drawn = client.upload_image(photo(61)), client.upload_image(mask())
    fields = {"init_image": init, "mask_image": drawn, "strength": 1.0}
    _, from_folder = submitted(client, runner, model="tiny-inpainting", **fields)
    client.resolver.models.configs = configs
    runner.models.configs = configs
    _, from_file = submitted(client, runner, model="tiny-inpainting-file", **fields)
    assert np.array_equal(decoded(from_file), decoded(from_folder))
