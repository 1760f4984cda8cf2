"""T2I-Adapters: named like ControlNets (their folder, their import, a job's ``controlnets``),
told apart by their tensors; a job with one (and a LoRA) gives the image of diffusers' own adapter
pipelines from the same map and seed on the tiny SD1.5 and SDXL; jobs with different maps share
a call; the PNG regenerates pixel for pixel; what diffusers' adapter pipelines cannot do is
refused at submit naming the field, and what only a worker can see fails the job saying why."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.common.catalog.controlnets import ControlNetCatalog, ControlNetError
from lorafleet.common.schema.errors import JobRejected
from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_t2i_adapter
from tests.conftest import TINY, TINY_XL
from tests.worker.test_controlnets import control_map
from tests.worker.test_images_in import JOB
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

AD = "tiny-sketch"


@pytest.fixture(scope="module")
def adapter_folder(template_home, tmp_path_factory):
    return make_tiny_t2i_adapter(template_home / "models" / TINY, tmp_path_factory.mktemp("t2i") / AD)


@pytest.fixture
def settings(settings, adapter_folder):  # conftest's, with the T2I-Adapter dropped in
    shutil.copytree(adapter_folder, settings.controlnet_dir / AD)
    return settings


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
