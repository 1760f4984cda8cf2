"""IP-Adapters: a job with an image prompt (and a LoRA) gives the image of diffusers' own pipeline
with the same IP-Adapter, image and seed, on the tiny SD1.5 and SDXL; the adapter leaves the
pipeline as it found it; the PNG names it and its images and regenerates pixel for pixel; a folder
that is no IP-Adapter, or a name that names nothing, is refused at submit naming the field."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.worker.tiny import make_tiny_ip_adapter
from tests.conftest import TINY
from tests.worker.test_images_in import (  # noqa: F401
    JOB,
    XL_LORA,
    decoded,
    merge_peft,
    photo,
    reference,
    sdxl_pipeline,
    submitted,
    with_xl_lora,
    xl_lora_file,
)
from tests.worker.test_runner import client  # noqa: F401

IP = "tiny-ip"


@pytest.fixture(scope="module")
def ip_folder(template_home, tmp_path_factory):
    return make_tiny_ip_adapter(template_home / "models" / TINY, tmp_path_factory.mktemp("ip") / IP)


@pytest.fixture
def settings(settings, ip_folder):  # conftest's, with the IP-Adapter dropped in
    shutil.copytree(ip_folder, settings.ip_adapter_dir / IP)
    return settings


def diffusers_ip_image(pipe, folder, image: bytes, weight: float):
    pipe.load_ip_adapter(
        str(folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder="image_encoder"
    )
    pipe.set_ip_adapter_scale(weight)
    try:
        out = pipe(
            prompt=JOB["prompt"],
            ip_adapter_image=[[Image.open(io.BytesIO(image)).convert("RGB")]],
            guidance_scale=7.0,
            num_inference_steps=JOB["steps"],
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        )
    finally:
        pipe.unload_ip_adapter()
    return np.asarray(out.images[0].convert("RGB")).astype(int)


def test_an_ip_adapter_job_gives_diffusers_own_image_and_leaves_the_pipeline_as_it_was(
    client, runner, reference, ip_folder, tmp_path
):
    before, _ = submitted(client, runner, width=64, height=64)
    face = photo(11, size=(96, 80))
    unit = {"model": IP, "images": [client.upload_image(face)], "weight": 0.8}
    record, png = submitted(client, runner, ip_adapter=unit, width=64, height=64)
    want = diffusers_ip_image(reference, ip_folder, face, 0.8)
    assert np.abs(decoded(png) - want).max() <= 2
    after, _ = submitted(client, runner, width=64, height=64)
    plain = [decoded(runner.storage.get(r.images[0].key)) for r in (before, after)]
    assert np.array_equal(*plain), "the IP-Adapter was not removed after its job"
    [hot] = runner.pipelines.loaded()
    assert hot.pipe.image_encoder is None and hot.pipe.feature_extractor is None  # as it was loaded
    assert np.abs(plain[0] - decoded(png)).max() > 10
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert (
        fields["IP-Adapter"].startswith(f"Model: {IP} [") and fields["IP-Adapter images"] == unit["images"][0]
    )
    path = tmp_path / "ip.png"
    path.write_bytes(png)
    again = client.submit(client.job_from_png(path))
    runner.run(again.job_id)
    redone = client.get(again.job_id)
    assert redone.job.ip_adapter.model == IP and redone.job.ip_adapter.weight == 0.8
    assert np.array_equal(decoded(runner.storage.get(redone.images[0].key)), decoded(png))


def test_what_is_no_ip_adapter_is_refused_naming_the_field(client, settings):
    from tests.producer.test_client import queued_messages

    image = client.upload_image(photo(12))
    broken = settings.ip_adapter_dir / "no-encoder"
    broken.mkdir(parents=True)
    shutil.copy(settings.ip_adapter_dir / IP / "ip-adapter.safetensors", broken / "ip-adapter.safetensors")
    from safetensors.torch import load_file, save_file

    faceid = settings.ip_adapter_dir / "faceid"
    shutil.copytree(settings.ip_adapter_dir / IP, faceid)
    state = load_file(str(faceid / "ip-adapter.safetensors"))
    state["ip_adapter.1.to_k_lora.down.weight"] = state["ip_adapter.1.to_k_ip.weight"][:4].clone()
    save_file(state, str(faceid / "ip-adapter.safetensors"))
    cases = [
        ({"model": "faceid", "images": [image]}, "ip_adapter.model", "a FaceID IP-Adapter"),
        ({"model": "nowhere", "images": [image]}, "ip_adapter.model", "unknown IP-Adapter 'nowhere'"),
        ({"model": "no-encoder", "images": [image]}, "ip_adapter.model", "no image_encoder/"),
        ({"model": IP, "images": ["sha256:" + "2" * 64]}, "ip_adapter.images[0]", "upload it first"),
        ({"model": IP, "images": []}, "ip_adapter.images", "at least 1"),
    ]
    for unit, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | {"ip_adapter": unit})
        assert refused.value.field == field and words in str(refused.value), (unit, refused.value)
    assert queued_messages(client) == []


def test_an_sdxl_ip_adapter_job_with_a_lora_gives_diffusers_own_image(client, runner, settings, xl_lora_file):
    from lorafleet.common.schema.jobs import JobStatus
    from lorafleet.worker.tiny import make_tiny_model

    folder = make_tiny_model(settings.models_dir / "tiny-sdxl", family="sdxl")
    make_tiny_ip_adapter(folder, settings.ip_adapter_dir / "sdxl-ip")
    state = with_xl_lora(settings, xl_lora_file)
    face = photo(13)
    unit = {"model": "sdxl-ip", "images": [client.upload_image(face)], "weight": 0.7}
    stack = [{"name": XL_LORA[0], "weight": XL_LORA[1]}]
    handle = client.submit(
        JOB | {"model": "tiny-sdxl", "ip_adapter": unit, "loras": stack, "width": 64, "height": 64}
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    got = decoded(runner.storage.get(record.images[0].key))
    pipe = sdxl_pipeline(folder)
    plain = diffusers_ip_image(pipe, settings.ip_adapter_dir / "sdxl-ip", face, 0.7)
    merge_peft(pipe, state, XL_LORA[1])
    want = diffusers_ip_image(pipe, settings.ip_adapter_dir / "sdxl-ip", face, 0.7)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - plain).max() > 4  # nearer want than diffusers' image without the LoRA
    with pytest.raises(JobRejected, match="made for a 80-wide text embedding but model 'tiny-sd15' reads 32"):
        client.submit(JOB | {"ip_adapter": unit})


def test_make_tiny_ip_adapter_writes_one_the_catalog_takes(template_home, tmp_path):
    from typer.testing import CliRunner

    from lorafleet.common.catalog.ip_adapters import IpAdapterCatalog
    from lorafleet.producer.cli import app

    out = tmp_path / "ip_adapter" / "tiny-ip"
    model = template_home / "models" / TINY
    made = CliRunner().invoke(app, ["make-tiny-ip-adapter", "--model", str(model), "--out", str(out)])
    assert made.exit_code == 0, made.output
    info = IpAdapterCatalog(out.parent).get("tiny-ip")
    assert info.weights_name == "ip-adapter.safetensors" and info.cross_attention_dim == 32  # tiny-sd15's
    refused = CliRunner().invoke(app, ["make-tiny-ip-adapter", "--model", str(tmp_path), "--out", str(out)])
    assert refused.exit_code == 2 and "--model" in refused.output
