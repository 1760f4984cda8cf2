"""T2I-Adapters: named like ControlNets (their folder, their import, a job's ``controlnets``),
told apart by their tensors; a job with one (and a LoRA) gives the image of diffusers' own adapter
pipelines from the same map and seed on the tiny SD1.5 and SDXL; jobs with different maps share
a call; the PNG regenerates pixel for pixel; what diffusers' adapter pipelines cannot do is
refused at submit naming the field, and what only a worker can see fails the job saying why."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lorafleet.common.catalog.controlnets import ControlNetCatalog, ControlNetError
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_t2i_adapter
from tests.conftest import TINY, TINY_XL
from tests.worker.test_controlnets import control_map, says_its_unit_and_regenerates
from tests.worker.test_images_in import (  # noqa: F401  (reference and xl_lora_file are fixtures)
    JOB,
    LORA,
    XL_LORA,
    decoded,
    merge_peft,
    reference,
    sdxl_pipeline,
    submitted,
    with_xl_lora,
    xl_lora_file,
)
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

AD = "tiny-sketch"


@pytest.fixture(scope="module")
def adapter_folder(template_home, tmp_path_factory):
    return make_tiny_t2i_adapter(template_home / "models" / TINY, tmp_path_factory.mktemp("t2i") / AD)


@pytest.fixture
def settings(settings, adapter_folder):  # conftest's, with the T2I-Adapter dropped in
    shutil.copytree(adapter_folder, settings.controlnet_dir / AD)
    return settings


def diffusers_adapter_image(
    pipe, folders, maps: list[bytes], weights: list[float], end=1.0, seed=JOB["seed"]
):
    """The image of diffusers' own adapter pipeline over ``pipe`` (one T2I-Adapter per folder,
    several as its MultiAdapter), from the same maps, weights and seed as the job."""
    from diffusers import (
        MultiAdapter,
        StableDiffusionAdapterPipeline,
        StableDiffusionXLAdapterPipeline,
        T2IAdapter,
    )

    adapters = [T2IAdapter.from_pretrained(str(folder)) for folder in folders]
    xl = type(pipe).__name__.startswith("StableDiffusionXL")
    kind = StableDiffusionXLAdapterPipeline if xl else StableDiffusionAdapterPipeline
    derived = kind.from_pipe(pipe, adapter=adapters[0] if len(adapters) == 1 else MultiAdapter(adapters))
    derived.set_progress_bar_config(disable=True)
    images = [Image.open(io.BytesIO(m)).convert("RGB") for m in maps]
    single = len(images) == 1
    arguments = dict(
        prompt=JOB["prompt"],
        image=images[0] if single else images,
        adapter_conditioning_scale=weights[0] if single else weights,
        guidance_scale=7.0,
        num_inference_steps=JOB["steps"],
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    if xl:
        arguments["adapter_conditioning_factor"] = end
    return np.asarray(derived(**arguments).images[0].convert("RGB")).astype(int)


def original_layout(path):
    """A T2I-Adapter file with TencentARC's own names (conv_in, body.N.block1), which diffusers cannot load."""
    zeros = {
        "conv_in.weight": torch.zeros(32, 192, 3, 3),
        "body.0.block1.weight": torch.zeros(32, 32, 3, 3),
        "body.0.block2.weight": torch.zeros(32, 32, 1, 1),
    }
    save_file(zeros, str(path))
    return path


def test_a_t2i_adapter_is_told_from_a_controlnet_by_its_tensors(settings, adapter_folder, template_home):
    make_tiny_controlnet(template_home / "models" / TINY, settings.controlnet_dir / "tiny-canny")
    shutil.copy(
        adapter_folder / "diffusion_pytorch_model.safetensors", settings.controlnet_dir / "single.safetensors"
    )
    original_layout(settings.controlnet_dir / "tencent.safetensors")
    catalog = ControlNetCatalog(settings.controlnet_dir)
    folder, single, controlnet = catalog.get(AD), catalog.get("single"), catalog.get("tiny-canny")
    assert (folder.kind, single.kind, controlnet.kind) == ("t2i_adapter", "t2i_adapter", "controlnet")
    assert folder.adapter == single.adapter  # the file's keys say what the folder's config says
    assert (single.adapter.adapter_type, single.adapter.channels, single.adapter.downscale_factor) == (
        "full_adapter",
        (32, 64),
        8,
    )
    assert controlnet.adapter is None and controlnet.cross_attention_dim == 32
    with pytest.raises(ControlNetError) as refused:
        catalog.get("tencent")
    assert "tencent.safetensors" in str(refused.value) and "TencentARC's original layout" in str(
        refused.value
    )
    assert "diffusers T2I-Adapter" in str(refused.value)


@pytest.mark.slow
def test_the_cli_imports_and_lists_t2i_adapters_with_their_kind(
    settings, home, redis_url, adapter_folder, tmp_path
):
    import json

    from tests.helpers import lorafleet_env, run_cli

    env = lorafleet_env(home, redis_url, settings.storage_url)
    single = tmp_path / "sketch-single.safetensors"
    shutil.copy(adapter_folder / "diffusion_pytorch_model.safetensors", single)
    imported = run_cli(["controlnets", "import", str(single), "--name", "shared-sketch"], env)
    assert imported.returncode == 0 and "registered as 'shared-sketch'" in imported.stdout, imported.stderr
    (settings.controlnet_dir / "shared-sketch.safetensors").unlink()  # only the registry's entry left
    listed = {row["name"]: row for row in json.loads(run_cli(["controlnets", "list", "--json"], env).stdout)}
    for name in (AD, "shared-sketch"):
        assert listed[name]["kind"] == "t2i_adapter", listed[name]
        assert listed[name]["adapter"]["channels"] == [32, 64]
    shown = run_cli(["controlnets", "list"], env).stdout
    assert "T2I-Adapter (full_adapter), widths 32, 64" in shown, shown
    refused = run_cli(["controlnets", "import", str(original_layout(tmp_path / "tencent.safetensors"))], env)
    assert refused.returncode == 2 and "TencentARC's original layout" in refused.stderr, refused.stderr


def test_what_diffusers_adapter_pipelines_cannot_do_is_refused_at_submit_naming_the_field(
    client, settings, template_home
):
    from diffusers import T2IAdapter

    from tests.producer.test_client import queued_messages

    image = client.upload_image(control_map(1))
    make_tiny_t2i_adapter(template_home / "models" / TINY_XL, settings.controlnet_dir / "sdxl-sketch")
    make_tiny_controlnet(template_home / "models" / TINY, settings.controlnet_dir / "tiny-canny")
    T2IAdapter(channels=[16, 32], num_res_blocks=1).save_pretrained(str(settings.controlnet_dir / "narrow"))
    unit, xl = {"model": AD, "image": image}, {"model": "sdxl-sketch", "image": image}
    on_xl = {"model": TINY_XL, "width": 64, "height": 64}
    cases = [
        ({"controlnets": [unit | {"start": 0.2}]}, "controlnets[0].start", "from the first step"),
        ({"controlnets": [unit | {"end": 0.5}]}, "controlnets[0].end", "on every step"),
        (
            {"controlnets": [unit, {"model": "tiny-canny", "image": image}]},
            "controlnets[1].model",
            "ControlNet",
        ),
        ({"controlnets": [unit], "init_image": image, "strength": 0.5}, "init_image", "text to image"),
        (
            {"controlnets": [unit], "ip_adapter": {"model": "x", "images": [image]}},
            "ip_adapter",
            "IP-Adapter",
        ),
        ({"controlnets": [xl]}, "controlnets[0].model", "made for another model family"),
        ({"controlnets": [{"model": "narrow", "image": image}]}, "controlnets[0].model", "16, 32 wide"),
        (on_xl | {"controlnets": [xl], "width": 72}, "width", "multiple of 16"),
        (on_xl | {"controlnets": [xl | {"end": 0.5}, xl]}, "controlnets[1].end", "end 0.5"),
    ]
    for fields, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | fields)
        assert refused.value.field == field and words in str(refused.value), (fields, refused.value)
    assert queued_messages(client) == []


def test_a_t2i_adapter_job_with_a_lora_gives_diffusers_own_image_and_its_png_regenerates(
    client, runner, reference, adapter_folder, tmp_path
):
    mapped = control_map(1)
    unit = {"model": AD, "image": client.upload_image(mapped), "weight": 0.8}
    record, png = submitted(client, runner, controlnets=[unit], width=64, height=64)
    want = diffusers_adapter_image(reference, [adapter_folder], [mapped], [0.8])
    assert np.abs(decoded(png) - want).max() <= 2
    plain, _ = submitted(client, runner, width=64, height=64)
    assert np.abs(decoded(runner.storage.get(plain.images[0].key)) - decoded(png)).max() > 10
    says_its_unit_and_regenerates(client, runner, png, unit, 0.8, tmp_path)


def test_two_t2i_adapters_on_jobs_sharing_a_call_give_diffusers_own_images_and_their_own_pixels(
    client, runner, reference, adapter_folder, settings
):
    shutil.copy(
        adapter_folder / "diffusion_pytorch_model.safetensors", settings.controlnet_dir / "second.safetensors"
    )
    maps = [[control_map(10 + 2 * n), control_map(11 + 2 * n)] for n in range(2)]
    stack = {"loras": [{"name": LORA[0], "weight": LORA[1]}], "width": 64, "height": 64}
    jobs = [
        JOB
        | stack
        | {
            "seed": 100 + n,
            "controlnets": [
                {"model": AD, "image": client.upload_image(pair[0]), "weight": 0.8},
                {"model": "second", "image": client.upload_image(pair[1]), "weight": 0.5},  # a single file
            ],
        }
        for n, pair in enumerate(maps)
    ]
    alone = client.submit(jobs[0])
    runner.run(alone.job_id)
    handles = [client.submit(job) for job in jobs]
    runner.run(handles[0].job_id)  # both in one call, each row with its own two maps
    records = [client.get(h.job_id) for h in [alone, *handles]]
    assert all(r.status is JobStatus.succeeded and r.attempts == 1 for r in records), [
        r.error for r in records
    ]
    got = [decoded(runner.storage.get(r.images[0].key)) for r in records]
    assert np.array_equal(got[1], got[0])  # its companion changed nothing
    for n, pair in enumerate(maps):
        want = diffusers_adapter_image(reference, [adapter_folder] * 2, pair, [0.8, 0.5], seed=100 + n)
        assert np.abs(got[n + 1] - want).max() <= 2


def test_an_sdxl_t2i_adapter_job_with_a_lora_gives_diffusers_own_image(
    client, runner, settings, template_home, xl_lora_file
):
    folder = make_tiny_t2i_adapter(
        template_home / "models" / TINY_XL, settings.controlnet_dir / "sdxl-sketch"
    )
    state = with_xl_lora(settings, xl_lora_file)
    mapped = control_map(5)
    unit = {"model": "sdxl-sketch", "image": client.upload_image(mapped), "weight": 0.9, "end": 0.125}
    stack = [{"name": XL_LORA[0], "weight": XL_LORA[1]}]
    handle = client.submit(
        JOB | {"model": TINY_XL, "controlnets": [unit], "loras": stack, "width": 64, "height": 64}
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    got = decoded(runner.storage.get(record.images[0].key))
    pipe = sdxl_pipeline(settings.models_dir / TINY_XL)
    plain = diffusers_adapter_image(pipe, [folder], [mapped], [0.9], end=0.125)
    merge_peft(pipe, state, XL_LORA[1])
    want = diffusers_adapter_image(pipe, [folder], [mapped], [0.9], end=0.125)
    throughout = diffusers_adapter_image(pipe, [folder], [mapped], [0.9], end=1.0)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - plain).max() > 4  # nearer want than diffusers' image without the LoRA
    assert np.abs(got - throughout).max() > 4  # end 0.125: it acted on the first of the 8 steps only


def test_an_adapter_that_does_not_fit_a_model_only_workers_see_fails_the_job_naming_both(
    client, runner, settings
):
    from diffusers import T2IAdapter

    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.common.schema.family import Family

    T2IAdapter(channels=[16, 32], num_res_blocks=1).save_pretrained(str(settings.controlnet_dir / "narrow"))
    on_workers = settings.home.parent / "on-the-workers" / TINY  # not here at submit
    ModelRegistry(client.settings, client.redis).register("remote-sd15", str(on_workers), family=Family.sd15)
    unit = {"model": "narrow", "image": client.upload_image(control_map(7))}
    handle = client.submit(JOB | {"model": "remote-sd15", "width": 64, "height": 64, "controlnets": [unit]})
    shutil.copytree(settings.models_dir / TINY, on_workers)
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.failed
    assert "T2I-Adapter 'narrow' does not fit model 'remote-sd15'" in record.error, record.error
    assert "16, 32 wide but the model's UNet blocks are 32, 64" in record.error
