"""Images in: img2img and inpainting jobs on the tiny SD1.5 and SDXL, with a LoRA stack, give the
image diffusers' own image-to-image and inpainting pipelines give from the same inputs and seed
(the LoRA merged here in float64); jobs with different init images share a call, each as it
would be alone; the PNG names its inputs and regenerates pixel for pixel; hostile images are
refused at upload or submit with nothing stored."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.common.schema.jobs import JobStatus
from tests.conftest import TINY, TINY_XL
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

JOB = {"model": TINY, "prompt": "a lighthouse at night", "seed": 1234, "steps": 8, "sampler": "euler"}
LORA = ("ink-sketch", 0.8)  # a PEFT LoRA of the demo set (UNet only)
XL_LORA = ("ink-sketch-xl", 0.8)  # the same demo LoRA made for the tiny SDXL (xl_lora_file)


def photo(seed: int, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mask(size=(64, 64), box=(16, 16, 48, 40)) -> bytes:
    image = Image.new("L", size, 0)
    image.paste(255, box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def reference(template_home):
    """diffusers' own SD1.5 pipeline with the LoRA merged in float64 (the PEFT file's own math)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(template_home / "models" / TINY), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    merge_peft(
        pipe, load_file(str(template_home / "autoimport" / "lora" / f"{LORA[0]}.safetensors")), LORA[1]
    )
    return pipe


def merge_peft(pipe, state: dict[str, torch.Tensor], weight: float) -> None:
    """A PEFT LoRA merged in float64 into each component of ``pipe`` its keys name (``unet.``,
    ``text_encoder.``, ``text_encoder_2.``), by the file's own math: W + weight x (B @ A),
    rounded once to the weight's dtype."""
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state), "not a PEFT LoRA"
    with torch.no_grad():
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                component, name = key[: -len(".lora_A.weight")].split(".", 1)
                module = getattr(pipe, component).get_submodule(name)
                up = state[key.replace("lora_A", "lora_B")]
                delta = (up.double() @ down.double()).view_as(module.weight)
                module.weight.copy_((module.weight.double() + weight * delta).to(module.weight.dtype))


@pytest.fixture(scope="module")
def xl_lora_file(template_home, tmp_path_factory):
    """The PEFT LoRA (UNet only) of the demo set made for the tiny SDXL, at three times the demo
    strength: at the demo's own, the tiny SDXL ControlNet's image moves by only 3 levels."""
    from lorafleet.worker.tiny import make_demo_loras

    written = make_demo_loras(
        template_home / "models" / TINY_XL, tmp_path_factory.mktemp("xl-loras"), strength=0.15
    )
    [peft] = [p for p in written if all(k.startswith("unet.") for k in load_file(str(p)))]
    return peft


def with_xl_lora(settings, path) -> dict[str, torch.Tensor]:
    """The LoRA file at ``path`` dropped into the LoRA folder as ``XL_LORA``'s name (the SD1.5
    demo LoRA of its file name is there already); its tensors."""
    shutil.copy(path, settings.lora_dir / f"{XL_LORA[0]}.safetensors")
    return load_file(str(path))


def sdxl_pipeline(folder):
    """diffusers' own SDXL pipeline for the tiny SDXL in ``folder``, with lorafleet's Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(
    pipe,
    kind: str,
    init: bytes,
    strength: float,
    mask_bytes: bytes | None = None,
    overlay: bool = False,
    **extra,
):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    image = Image.open(io.BytesIO(init)).convert("RGB")
    arguments = dict(
        prompt=JOB["prompt"],
        image=image,
        strength=strength,
        guidance_scale=7.0,
        num_inference_steps=JOB["steps"],
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        output_type="pil",  # as lorafleet stores it (and the only type diffusers crops with)
    )
    if kind == "inpaint":
        derived = AutoPipelineForInpainting.from_pipe(pipe)
        blurred = derived.mask_processor.blur(Image.open(io.BytesIO(mask_bytes)).convert("L"), blur_factor=4)
        arguments |= {"mask_image": blurred, "height": image.height, "width": image.width} | extra
    else:
        derived = AutoPipelineForImage2Image.from_pipe(pipe)
    derived.set_progress_bar_config(disable=True)
    out = derived(**arguments).images[0]
    if overlay:  # A1111's paste-back of what the mask keeps, with diffusers' own helper
        out = derived.image_processor.apply_overlay(arguments["mask_image"], image, out)
    return np.asarray(out.convert("RGB")).astype(int)


def submitted(client, runner, **fields):  # noqa: F811
    handle = client.submit(JOB | {"loras": [{"name": LORA[0], "weight": LORA[1]}]} | fields)
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    return record, runner.storage.get(record.images[0].key)


def test_an_img2img_job_with_a_lora_gives_diffusers_own_image(client, runner, reference):  # noqa: F811
    init = photo(1)
    ref = client.upload_image(init)
    record, png = submitted(client, runner, init_image=ref, strength=0.6)
    assert (record.job.width, record.job.height, record.job.strength) == (64, 64, 0.6)
    assert record.progress.total == 4  # int(8 steps x 0.6)
    want = diffusers_image(reference, "img2img", init, 0.6)
    assert np.abs(decoded(png) - want).max() <= 2
    plain, _ = submitted(client, runner)  # no init image: another picture
    assert not np.array_equal(decoded(runner.storage.get(plain.images[0].key)), decoded(png))


def test_an_inpainting_job_repaints_the_masked_region_as_diffusers_does(client, runner, reference):  # noqa: F811
    init, drawn = photo(2), mask()
    record, png = submitted(
        client,
        runner,
        init_image=client.upload_image(init),
        mask_image=client.upload_image(drawn),
        strength=0.9,
    )
    want = diffusers_image(reference, "inpaint", init, 0.9, drawn, overlay=True)
    got = decoded(png)
    assert np.abs(got - want).max() <= 2
    # what the (blurred) mask leaves black is the init image's own pixels, as in A1111
    blurred = Image.open(io.BytesIO(drawn)).filter(ImageFilter.GaussianBlur(4))  # mask_processor.blur's
    kept = np.asarray(blurred) == 0
    assert np.array_equal(got[kept], decoded(init)[kept]) and kept.sum() > 1000
    assert np.abs(got - decoded(init))[~kept].mean() > 5
    # "Only masked": the region cropped with its padding, sampled at the job's size, pasted back
    _, cropped = submitted(
        client,
        runner,
        init_image=client.upload_image(init),
        mask_image=client.upload_image(drawn),
        strength=0.9,
        inpaint_padding=8,
    )
    want = diffusers_image(reference, "inpaint", init, 0.9, drawn, padding_mask_crop=8)
    assert np.abs(decoded(cropped) - want).max() <= 2


def test_jobs_with_different_init_images_share_a_call_and_keep_their_pixels(client, runner):  # noqa: F811
    refs = [client.upload_image(photo(n)) for n in range(3)]
    alone = {}
    for ref in refs:
        record, png = submitted(client, runner, init_image=ref, strength=0.7)
        alone[ref] = decoded(png)
    stack = {"loras": [{"name": LORA[0], "weight": LORA[1]}]}
    handles = [client.submit(JOB | stack | {"init_image": ref, "strength": 0.7}) for ref in refs]
    runner.run(handles[0].job_id)  # the others are taken along into its call: they end with it
    records = [client.get(h.job_id) for h in handles]
    assert all(r.status is JobStatus.succeeded and r.attempts == 1 for r in records)
    for ref, record in zip(refs, records):
        assert np.array_equal(decoded(runner.storage.get(record.images[0].key)), alone[ref])


def test_the_png_names_its_inputs_and_regenerates_pixel_for_pixel(client, runner, tmp_path):  # noqa: F811
    init, drawn = client.upload_image(photo(4)), client.upload_image(mask())
    record, png = submitted(client, runner, init_image=init, mask_image=drawn, strength=0.8, mask_blur=6)
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert fields["Denoising strength"] == "0.8" and fields["Mask blur"] == "6"
    assert (fields["Init image"], fields["Mask image"]) == (init, drawn)
    path = tmp_path / "inpainted.png"
    path.write_bytes(png)
    again = client.submit(client.job_from_png(path))
    runner.run(again.job_id)
    redone = client.get(again.job_id)
    assert (redone.job.init_image, redone.job.mask_image, redone.job.mask_blur) == (init, drawn, 6)
    assert np.array_equal(decoded(runner.storage.get(redone.images[0].key)), decoded(png))


def stored_inputs(runner) -> list[str]:
    root = runner.storage.root / "inputs"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"GIF89a not really", "not an image"),
        (photo(5)[:200], "damaged"),
        ("bomb", "decompression bomb"),
    ],
)
def test_a_hostile_upload_is_refused_and_nothing_is_stored(client, runner, data, words):  # noqa: F811
    if data == "bomb":  # 20000 x 20000 one-bit pixels: 50 KB of PNG, 400 million pixels
        buffer = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buffer, format="PNG")
        data = buffer.getvalue()
        assert len(data) < 200_000
    with pytest.raises(JobRejected) as refused:
        client.upload_image(data, field="init_image")
    assert refused.value.field == "init_image" and words in refused.value.reason
    assert stored_inputs(runner) == []


def test_what_does_not_fit_is_refused_at_submit_naming_the_field(client, runner, settings):  # noqa: F811
    from tests.producer.test_client import queued_messages

    init = client.upload_image(photo(6))
    cases = [
        (
            {"init_image": init, "mask_image": client.upload_image(mask(size=(64, 48), box=(0, 0, 8, 8)))},
            "mask_image",
        ),
        ({"init_image": "sha256:" + "0" * 64}, "init_image"),
        ({"init_image": "photo.png"}, "init_image"),
        ({"strength": 0.5}, "strength"),
        ({"init_image": init, "inpaint_padding": 8}, "inpaint_padding"),
    ]
    for fields, field in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | fields)
        assert refused.value.field == field, (fields, refused.value)
    assert queued_messages(client) == []
    assert "0" * 64 not in stored_inputs(runner)


def test_the_api_stores_an_upload_once_by_its_hash(settings, client):  # noqa: F811
    from fastapi.testclient import TestClient

    from lorafleet.producer.api import create_app

    data = photo(7)
    with TestClient(create_app(settings)) as api:
        first = api.post("/v1/images", content=data, headers={"content-type": "image/png"})
        again = api.post("/v1/images", content=data, headers={"content-type": "image/png"})
        bad = api.post("/v1/images", content=b"not an image", headers={"content-type": "image/png"})
    assert first.status_code == again.status_code == 201, first.text
    assert first.json() == again.json() and first.json()["image"].startswith("sha256:")
    assert (first.json()["width"], first.json()["height"]) == (64, 64)
    assert bad.status_code == 422 and "not an image" in bad.text


@pytest.fixture
def sdxl_home(home, tmp_path_factory):
    from lorafleet.worker.tiny import make_tiny_model

    make_tiny_model(home / "models" / "tiny-sdxl", family="sdxl")
    return home


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_sdxl_img2img_and_inpainting_with_a_lora_give_diffusers_own_image(
    sdxl_home,
    settings,
    client,  # noqa: F811
    runner,
    xl_lora_file,
    kind,
):
    state = with_xl_lora(settings, xl_lora_file)
    init, drawn = photo(8), mask()
    fields = {"model": "tiny-sdxl", "init_image": client.upload_image(init), "strength": 0.8}
    if kind == "inpaint":
        fields["mask_image"] = client.upload_image(drawn)
    handle = client.submit(JOB | fields | {"loras": [{"name": XL_LORA[0], "weight": XL_LORA[1]}]})
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    got = decoded(runner.storage.get(record.images[0].key))
    pipe = sdxl_pipeline(sdxl_home / "models" / "tiny-sdxl")
    inputs = (init, 0.8, drawn if kind == "inpaint" else None, kind == "inpaint")
    plain = diffusers_image(pipe, kind, *inputs)
    merge_peft(pipe, state, XL_LORA[1])
    want = diffusers_image(pipe, kind, *inputs)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - plain).max() > 4  # nearer want than diffusers' image without the LoRA


@pytest.mark.slow
def test_the_cli_uploads_an_init_image_file_for_the_job(settings, home, redis_url, client, tmp_path):  # noqa: F811
    import json

    from lorafleet.common.catalog.input_images import image_ref
    from tests.helpers import lorafleet_env, run_cli

    env = lorafleet_env(home, redis_url, settings.storage_url)
    data = photo(9, size=(72, 80))
    (tmp_path / "photo.png").write_bytes(data)
    args = ["submit", "--model", TINY, "--prompt", "restyled", "--strength", "0.5", "--json"]
    out = run_cli([*args, "--init-image", str(tmp_path / "photo.png")], env)
    assert out.returncode == 0, out.stderr
    [queued] = json.loads(out.stdout)
    job = client.get(queued["job_id"]).job
    assert (job.init_image, job.strength, job.width, job.height) == (image_ref(data), 0.5, 72, 80)
    missing = run_cli([*args, "--init-image", str(tmp_path / "nowhere.png")], env)
    assert missing.returncode == 2 and "--init-image" in missing.stderr


def test_a_job_whose_image_is_gone_fails_alone_and_its_companions_go_on(client, runner):  # noqa: F811
    from lorafleet.common.catalog.input_images import storage_key

    refs = [client.upload_image(photo(30 + n)) for n in range(2)]
    handles = [client.submit(JOB | {"init_image": ref, "strength": 0.7}) for ref in refs]
    (runner.storage.root / storage_key(refs[1])).unlink()  # deleted from the store after submit
    runner.run(handles[0].job_id)
    first, second = (client.get(h.job_id) for h in handles)
    assert first.status is JobStatus.succeeded, first.error
    assert second.status is JobStatus.failed and "an input image cannot be read" in second.error


def test_a_phone_photo_is_taken_upright_and_an_mpo_jpeg_is_taken(client, runner):  # noqa: F811
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show": a portrait taken with the phone held upright
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(photo(40, size=(80, 64)))))).save(
        buffer, format="JPEG", exif=exif.tobytes()
    )
    record, png = submitted(client, runner, init_image=client.upload_image(buffer.getvalue()), strength=0.5)
    assert (record.job.width, record.job.height) == (64, 80) and Image.open(io.BytesIO(png)).size == (64, 80)
    mpo = io.BytesIO()
    first, second = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    first.save(mpo, format="MPO", save_all=True, append_images=[second])
    assert client.upload_image(mpo.getvalue()).startswith("sha256:")


def test_the_default_size_keeps_the_init_images_shape(client):  # noqa: F811
    big = io.BytesIO()
    Image.new("RGB", (4032, 3024), "gray").save(big, format="PNG")  # a phone photo's size
    ref = client.upload_image(big.getvalue())
    handle = client.submit(JOB | {"init_image": ref})
    assert (handle.job.width, handle.job.height) == (2048, 1536)
    assert any("scaled down to fit 2048" in w for w in handle.warnings)
    wide = client.submit(JOB | {"init_image": ref, "width": 512}).job
    assert (wide.width, wide.height) == (512, 384)
    with pytest.raises(JobRejected) as refused:
        client.submit(JOB | {"mask_blur": 8})
    assert refused.value.field == "mask_blur"
    units = [{"model": "nowhere", "image": ref}]
    job = JOB | {"controlnets": units}
    with pytest.raises(JobRejected):
        client.submit(job)
    assert units == [{"model": "nowhere", "image": ref}]  # the caller's job is left as given
