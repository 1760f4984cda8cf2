"""ControlNets on FLUX.1: a job with a FLUX.1 ControlNet (and a LoRA) gives the image of
diffusers' own FluxControlNetPipeline from the same map and seed, unlike the image without it,
and its PNG regenerates pixel for pixel; two FLUX ControlNets run as FluxMultiControlNetModel;
an SD ControlNet on FLUX.1, a FLUX.1 ControlNet on SD, one with an init image and ControlNets
on the other flow families are refused at submit naming the field, nothing queued; a single
FLUX ControlNet file and XLabs' original names are refused by name."""

# ruff: noqa: F811  (client is a fixture imported from another test module)

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from lorafleet.common.catalog.controlnets import ControlNetCatalog
from lorafleet.common.schema.errors import JobRejected
from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_model
from lorafleet.worker.tiny_flow import make_tiny_flux_controlnet
from tests.conftest import TINY
from tests.worker.conftest import dropped_in
from tests.worker.test_controlnets import control_map, says_its_unit_and_regenerates
from tests.worker.test_flow_images_in import JOB
from tests.worker.test_flux1 import expected_deltas, merged_reference
from tests.worker.test_images_in import decoded, photo
from tests.worker.test_runner import client  # noqa: F401

CN, SECOND = "flux-canny", "flux-depth"
LORA = ("flux1-peft", 0.8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from lorafleet.worker.tiny import make_demo_loras

    root = tmp_path_factory.mktemp("flux-controlnets")
    built = {
        family: make_tiny_model(root / f"tiny-{family}", family=family) for family in ("flux1", "qwenimage")
    }
    make_demo_loras(built["flux1"], root / "flux1-loras")
    make_tiny_flux_controlnet(built["flux1"], root / CN, seed=1)
    make_tiny_flux_controlnet(built["flux1"], root / SECOND, seed=2)
    return root, built


@pytest.fixture
def settings(settings, folders):  # conftest's, with the flow models and the FLUX ControlNets
    root, built = folders
    settings = dropped_in(
        settings, models=built.values(), loras=[root / "flux1-loras" / "flux1-peft.safetensors"]
    )
    for name in (CN, SECOND):
        shutil.copytree(root / name, settings.controlnet_dir / name)
    return settings


def submitted(client, runner, **fields):
    handle = client.submit(JOB | {"model": "tiny-flux1"} | fields)
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status.value == "succeeded", record.error
    return record, runner.storage.get(record.images[0].key)


def reference(folders, lora: bool):
    root, built = folders
    pipe = DiffusionPipeline.from_pretrained(str(built["flux1"]), local_files_only=True)
    if lora:
        state = load_file(str(root / "flux1-loras" / "flux1-peft.safetensors"))
        merged_reference(pipe, pipe, [(expected_deltas(pipe, state, "peft"), LORA[1])])
    return pipe


def diffusers_image(pipe, folders, maps: list[bytes], weights: list[float], **extra):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    root, _ = folders
    nets = [FluxControlNetModel.from_pretrained(str(root / name)) for name in (CN, SECOND)[: len(maps)]]
    derived = FluxControlNetPipeline.from_pipe(
        pipe, controlnet=nets[0] if len(nets) == 1 else FluxMultiControlNetModel(nets)
    )
    derived.set_progress_bar_config(disable=True)
    images = [Image.open(io.BytesIO(m)).convert("RGB") for m in maps]
    out = derived(
        prompt=JOB["prompt"],
        control_image=images[0] if len(images) == 1 else images,
        controlnet_conditioning_scale=weights[0] if len(weights) == 1 else weights,
        num_inference_steps=JOB["steps"],
        width=64,
        height=64,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        **extra,
    ).images[0]
    return np.asarray(out.convert("RGB")).astype(int)


def test_a_flux_controlnet_job_with_a_lora_gives_diffusers_own_image_and_its_png_regenerates(
    client, runner, folders, tmp_path
):
    mapped = control_map(11)
    unit = {"model": CN, "image": client.upload_image(mapped), "weight": 0.9}
    stack = {"loras": [{"name": LORA[0], "weight": LORA[1]}]}
    _, png = submitted(client, runner, controlnets=[unit], **stack)
    want = diffusers_image(reference(folders, lora=True), folders, [mapped], [0.9])
    assert np.abs(decoded(png) - want).max() <= 2
    _, plain = submitted(client, runner, **stack)
    assert np.abs(decoded(plain) - decoded(png)).max() > 10
    says_its_unit_and_regenerates(client, runner, png, unit, 0.9, tmp_path)


def test_two_flux_controlnets_give_diffusers_own_multi_controlnet_image(client, runner, folders):
    maps = [control_map(12), control_map(13)]
    units = [
        {"model": CN, "image": client.upload_image(maps[0]), "weight": 0.8},
        {"model": SECOND, "image": client.upload_image(maps[1]), "weight": 0.5, "end": 0.5},
    ]
    _, png = submitted(client, runner, controlnets=units)
    want = diffusers_image(
        reference(folders, lora=False),
        folders,
        maps,
        [0.8, 0.5],
        control_guidance_start=[0.0, 0.0],
        control_guidance_end=[1.0, 0.5],
    )
    assert np.abs(decoded(png) - want).max() <= 2


def test_controlnets_across_families_an_init_image_and_other_flow_families_are_refused(
    client, settings, runner
):
    from tests.producer.test_client import queued_messages

    make_tiny_controlnet(settings.models_dir / TINY, settings.controlnet_dir / "sd-canny")
    image = client.upload_image(control_map(14))
    flux_unit, sd_unit = {"model": CN, "image": image}, {"model": "sd-canny", "image": image}
    cases = [
        ({"model": TINY, "controlnets": [flux_unit]}, "controlnets[0].model", "is for FLUX.1 but model"),
        (
            {"model": "tiny-flux1", "controlnets": [sd_unit]},
            "controlnets[0].model",
            "is for SD 1.x, SD 2.x or SDXL",
        ),
        (
            {"model": "tiny-flux1", "controlnets": [flux_unit], "init_image": client.upload_image(photo(15))},
            "init_image",
            "text to image only",
        ),
        ({"model": "tiny-qwenimage", "controlnets": [flux_unit]}, "controlnets", "ControlNets run on SD 1.x"),
    ]
    for fields, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | fields)
        assert refused.value.field == field and words in str(refused.value), (fields, refused.value)
    assert queued_messages(client) == []


def test_a_flux_controlnet_single_file_or_xlabs_file_is_refused_by_name(settings, folders, tmp_path):
    root, _ = folders
    state = load_file(str(root / CN / "diffusion_pytorch_model.safetensors"))
    save_file(state, str(settings.controlnet_dir / "flux-single.safetensors"))
    save_file(
        {
            "double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4),
            "input_hint_block.0.weight": torch.zeros(4),
        },
        str(settings.controlnet_dir / "flux-xlabs.safetensors"),
    )
    catalog = ControlNetCatalog(settings.controlnet_dir)
    info = catalog.get(CN)
    assert (info.family, info.transformer_width, info.meta()["family"]) == ("flux1", 32, "flux1")
    for name, words in (("flux-single", "as a single file"), ("flux-xlabs", "XLabs' original")):
        with pytest.raises(Exception) as refused:
            catalog.get(name)
        assert words in str(refused.value) and "FluxControlNetModel folder" in str(refused.value), (
            refused.value
        )


def test_flux_jobs_with_different_control_maps_share_a_call_and_keep_their_pixels(client, runner):
    units = [{"model": CN, "image": client.upload_image(control_map(20 + n))} for n in range(3)]
    alone = [decoded(submitted(client, runner, controlnets=[unit])[1]) for unit in units]
    handles = [client.submit(JOB | {"model": "tiny-flux1", "controlnets": [unit]}) for unit in units]
    runner.run(handles[0].job_id)
    records = [client.get(h.job_id) for h in handles]
    assert all(r.status.value == "succeeded" and r.attempts == 1 for r in records)
    for record, want in zip(records, alone):
        assert np.array_equal(decoded(runner.storage.get(record.images[0].key)), want)


def test_make_tiny_controlnet_writes_a_flux_controlnet_for_a_tiny_flux_model(folders, tmp_path):
    from lorafleet.producer.cli.worker import make_tiny_controlnet as command

    _, built = folders
    command(built["flux1"], tmp_path / "controlnet" / "cli-flux", seed=3)
    info = ControlNetCatalog(tmp_path / "controlnet").get("cli-flux")
    assert (info.family, info.transformer_width) == ("flux1", 32)
