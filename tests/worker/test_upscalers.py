"""ESRGAN-family upscalers for the hires fix: the RRDB network read from each key layout people's
files use gives the published network's output (written out here from the raw tensors with
torch's functional convolutions); a hires job through one gives the two passes of diffusers'
own pipelines with that upscale between them; files that are not one, and names that name
none, are refused at submit naming ``hr_upscaler``; an imported one reaches other machines."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from lorafleet.common.catalog.shared_files import SharedFiles
from lorafleet.common.catalog.upscalers import UpscalerCatalog, describe_upscaler
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.worker.tiny import make_tiny_upscaler
from lorafleet.worker.upscalers import load_upscaler, upscale
from tests.worker.test_images_in import JOB, decoded, reference, submitted  # noqa: F401
from tests.worker.test_runner import client  # noqa: F401

NAME = "4x-tiny"


def published(state: dict[str, torch.Tensor], x: torch.Tensor, blocks: int) -> torch.Tensor:
    """ESRGAN's 4x generator (Wang et al. 2018) from its original file's tensors (``model.N``)."""

    def conv(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, state[f"{prefix}.weight"], state[f"{prefix}.bias"], padding=1)

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, 0.2)

    def dense(prefix: str, t: torch.Tensor) -> torch.Tensor:
        x1 = lrelu(conv(f"{prefix}.conv1.0", t))
        x2 = lrelu(conv(f"{prefix}.conv2.0", torch.cat((t, x1), 1)))
        x3 = lrelu(conv(f"{prefix}.conv3.0", torch.cat((t, x1, x2), 1)))
        x4 = lrelu(conv(f"{prefix}.conv4.0", torch.cat((t, x1, x2, x3), 1)))
        x5 = conv(f"{prefix}.conv5.0", torch.cat((t, x1, x2, x3, x4), 1))
        return x5 * 0.2 + t

    fea = conv("model.0", x)
    trunk = fea
    for n in range(blocks):
        inner = trunk
        for r in (1, 2, 3):
            inner = dense(f"model.1.sub.{n}.RDB{r}", inner)
        trunk = inner * 0.2 + trunk
    fea = fea + conv(f"model.1.sub.{blocks}", trunk)
    fea = lrelu(conv("model.3", F.interpolate(fea, scale_factor=2, mode="nearest")))
    fea = lrelu(conv("model.6", F.interpolate(fea, scale_factor=2, mode="nearest")))
    return conv("model.10", lrelu(conv("model.8", fea)))


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255


def published_upscale(state, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    out = published(state, pixels(image), blocks=2)[0].clamp(0, 1)
    out = Image.fromarray((out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
    return out.resize(size, Image.Resampling.LANCZOS)


@pytest.fixture
def upscalers(settings):
    folder = settings.upscaler_dir
    make_tiny_upscaler(folder / f"{NAME}.safetensors", layout="basicsr")
    make_tiny_upscaler(folder / "esrgan-old.safetensors", layout="esrgan-old")
    return folder


def test_every_key_layout_makes_the_published_network(tmp_path):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (12, 16, 3), dtype=np.uint8), "RGB")
    old = make_tiny_upscaler(tmp_path / "old.safetensors", layout="esrgan-old")
    want = np.asarray(published_upscale(load_file(str(old)), image, (64, 48)))
    for layout in ("basicsr", "esrgan", "esrgan-old"):
        info = describe_upscaler(make_tiny_upscaler(tmp_path / f"{layout}.safetensors", layout=layout))
        assert info.scale == 4 and info.shape["blocks"] == 2
        got = upscale(load_upscaler(info, torch.device("cpu")), image, (64, 48))
        assert got.size == (64, 48)
        assert np.abs(np.asarray(got).astype(int) - want.astype(int)).max() <= 1, layout
    for scale in (1, 2):  # Real-ESRGAN's 2x and 1x: a pixel unshuffle before the same net
        info = describe_upscaler(make_tiny_upscaler(tmp_path / f"x{scale}.safetensors", scale=scale))
        model = load_upscaler(info, torch.device("cpu"))
        assert info.scale == scale and model(pixels(image)).shape[-2:] == (12 * scale, 16 * scale)


def test_a_large_image_runs_in_tiles_exactly_where_their_context_covers_the_networks_reach(tmp_path):
    """Tiles keep a large image's activations to one tile's; with context as wide as the tiny
    net's reach (about 32 px at its input), the tiled image is the whole image's, bit for bit.
    Sides the 2x and 1x models' pixel unshuffle does not divide are padded and cut back."""
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8), "RGB")
    model = load_upscaler(
        describe_upscaler(make_tiny_upscaler(tmp_path / "4x.safetensors")), torch.device("cpu")
    )
    whole = upscale(model, image, (360, 280), tile=1024)
    assert np.array_equal(np.asarray(upscale(model, image, (360, 280), tile=32, pad=40)), np.asarray(whole))
    assert not np.array_equal(
        np.asarray(upscale(model, image, (360, 280), tile=32, pad=0)), np.asarray(whole)
    )
    for scale in (2, 1):
        info = describe_upscaler(make_tiny_upscaler(tmp_path / f"x{scale}.safetensors", scale=scale))
        odd, wanted = image.crop((0, 0, 17, 13)), (17 * scale + 1, 13 * scale + 1)  # the model runs once
        assert upscale(load_upscaler(info, torch.device("cpu")), odd, wanted).size == wanted


def test_a_hires_job_through_an_esrgan_upscaler_gives_diffusers_two_passes(
    client, runner, reference, upscalers
):
    from diffusers import AutoPipelineForImage2Image, EulerDiscreteScheduler

    record, png = submitted(
        client, runner, width=64, height=64, hr_scale=1.5, hr_upscaler=NAME, hr_strength=0.6
    )
    assert (record.images[0].width, record.images[0].height) == (96, 96)
    generator = torch.Generator("cpu").manual_seed(JOB["seed"])
    common = dict(prompt=JOB["prompt"], guidance_scale=7.0, generator=generator)
    first = reference(**common, num_inference_steps=JOB["steps"], width=64, height=64).images[0]
    state = load_file(str(make_tiny_upscaler(upscalers / "as-published.safetensors", layout="esrgan-old")))
    second = AutoPipelineForImage2Image.from_pipe(reference)
    second.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    second.set_progress_bar_config(disable=True)
    image = published_upscale(state, first, (96, 96))
    want = second(
        **common, image=image, strength=0.6, num_inference_steps=math.ceil(JOB["steps"] / 0.6)
    ).images[0]
    assert np.abs(decoded(png) - np.asarray(want.convert("RGB")).astype(int)).max() <= 2
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert fields["Hires upscaler"] == NAME  # as A1111 writes a model upscaler: its name


def test_an_upscaler_that_is_none_or_not_one_is_refused_naming_hr_upscaler(client, upscalers, settings):
    (upscalers / "lora-copy.safetensors").write_bytes(
        (settings.home / "autoimport" / "lora" / "watercolor.safetensors").read_bytes()
    )
    (upscalers / "pickled.pth").write_bytes(b"\x80\x04not loaded")
    cases = [
        ("R-ESRGAN 4x+", "unknown upscaler 'R-ESRGAN 4x+'"),
        ("lora-copy", "not an ESRGAN-family upscaler"),
        ("pickled", "pickled .pth file"),
        ("../escape", "neither a built-in upscaler"),
    ]
    for name, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | {"hr_scale": 1.5, "hr_upscaler": name})
        assert refused.value.field == "hr_upscaler" and words in str(refused.value), (name, refused.value)
    with pytest.raises(JobRejected) as refused:
        client.submit(JOB | {"hr_scale": 1.5, "hr_upscaler": "nothing"})
    assert NAME in str(refused.value) and "Latent (bicubic)" in str(refused.value)


def test_an_imported_upscaler_reaches_a_machine_without_the_file(settings, tmp_path):
    import redis

    from lorafleet.common.infra.storage import open_storage
    from lorafleet.producer.file_imports import import_file

    client = redis.Redis.from_url(settings.broker_url)
    source = make_tiny_upscaler(tmp_path / "sharp.safetensors", scale=2)
    imported = import_file(settings, "upscaler", source, client, name="2x-sharp")
    assert imported.destination == settings.upscaler_dir / "2x-sharp.safetensors"
    elsewhere = UpscalerCatalog(tmp_path / "empty", SharedFiles(client, "upscaler")).get("2x-sharp")
    assert elsewhere.path is None and elsewhere.scale == 2 and elsewhere.sha256 == imported.sha256
    assert open_storage(settings).get(elsewhere.object_key) == source.read_bytes()
