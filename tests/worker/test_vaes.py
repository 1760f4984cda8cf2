"""Separate VAEs: a single-file or diffusers-folder VAE in autoimport/vae decodes a job that
names it (or whose model names it), is named in the PNG as A1111 does, and never leaks into
the next job."""

from __future__ import annotations

import io

import pytest
import redis
import torch
from PIL import Image

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import BadArgument, JobRejected
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from lorafleet.worker.checkpoint_format import VAE_PREFIX, vae_to_original
from tests.conftest import TINY
from tests.worker.conftest import make_runner

JOB = {"model": TINY, "prompt": "a lighthouse", "seed": 11, "steps": 3}


@pytest.fixture
def vae_home(settings):
    """The tiny model's VAE with a dimmer decoder, as a single file and as a diffusers folder."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    vae = AutoencoderKL.from_pretrained(str(settings.models_dir / TINY / "vae"))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    folder = settings.vae_dir
    folder.mkdir(parents=True)
    state = {
        k.removeprefix(VAE_PREFIX): v.contiguous()
        for k, v in vae_to_original(vae.state_dict(), dict(vae.config)).items()
    }
    save_file(state, str(folder / "dim-vae.safetensors"))
    vae.save_pretrained(str(folder / "dim-vae-folder"))
    return settings


def pixels(runner, record) -> bytes:
    return Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).convert("RGB").tobytes()


def parameters(runner, record) -> str:
    return Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).text["parameters"]


def test_a_jobs_vae_decodes_it_is_named_in_the_png_and_does_not_leak(vae_home):
    runner = make_runner(vae_home)
    with Client(vae_home) as client:
        handles = [
            client.submit(JOB),
            client.submit(JOB | {"vae": "dim-vae"}),
            client.submit(JOB | {"vae": "dim-vae-folder"}),
            client.submit(JOB),
        ]
        for handle in handles:
            assert runner.run(handle.job_id) is JobStatus.succeeded
        plain, single, folder, after = (client.get(h.job_id) for h in handles)
    assert pixels(runner, single) != pixels(runner, plain)
    assert pixels(runner, single) == pixels(runner, folder)  # the same weights, either layout
    assert pixels(runner, after) == pixels(runner, plain)  # the pipeline's own VAE is back
    text = parameters(runner, single)
    short = vae_home.vae_dir.joinpath("dim-vae.safetensors")
    import hashlib

    assert (
        f"VAE hash: {hashlib.sha256(short.read_bytes()).hexdigest()[:10]}, VAE: dim-vae.safetensors" in text
    )
    assert "VAE" not in parameters(runner, plain)


def test_a_models_default_vae_is_used_and_recorded(vae_home, tmp_path):
    import shutil

    folder = tmp_path / "pipelines" / "house"
    shutil.copytree(vae_home.models_dir / TINY, folder)
    registry = ModelRegistry(vae_home, redis.Redis.from_url(vae_home.broker_url))
    registry.register("house", str(folder), vae="dim-vae")
    with pytest.raises(BadArgument, match="unknown VAE 'nope'"):
        registry.register("other", str(folder), vae="nope")
    assert "other" not in registry.registered()
    with Client(vae_home) as client:
        handle = client.submit(JOB | {"model": "house"})
        assert handle.job.vae == "dim-vae"
        explicit = client.submit(JOB | {"model": "house", "vae": "dim-vae-folder"})
        assert explicit.job.vae == "dim-vae-folder"


def test_an_unknown_or_refused_vae_is_refused_at_submit_naming_the_field(vae_home):
    lora = vae_home.lora_dir / "watercolor.safetensors"
    (vae_home.vae_dir / "not-a-vae.safetensors").write_bytes(lora.read_bytes())
    (vae_home.vae_dir / "old.pt").write_bytes(b"\x80\x04")
    with Client(vae_home) as client:
        for name, words in (("nope", "unknown VAE 'nope'"), ("not-a-vae", "not a VAE"), ("old", "pickled")):
            with pytest.raises(JobRejected, match=words) as refused:
                client.submit(JOB | {"vae": name})
            assert refused.value.field == "vae"
        for name in ("../models/x", ".hidden"):
            with pytest.raises(JobRejected, match="is not a VAE name"):
                client.submit(JOB | {"vae": name})
