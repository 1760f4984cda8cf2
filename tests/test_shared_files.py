"""Embeddings and VAEs across machines: imported on one, resolved on another, run on a third
that never had the files (they come from the object store, checked by hash)."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from PIL import Image

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import lorafleet_env, run_cli
from tests.worker.conftest import make_runner


@pytest.mark.slow  # the `lorafleet` command as a process
def test_an_imported_embedding_and_vae_are_used_by_a_worker_that_never_had_them(
    template_home, redis_url, tmp_path
):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from lorafleet.worker.checkpoint_format import VAE_PREFIX, vae_to_original

    store = str(tmp_path / "store")
    importer, submitter, worker = (
        copy_home(template_home, tmp_path / n) for n in ("importer", "submitter", "worker")
    )
    embedding = tmp_path / "downloads" / "glowstyle.safetensors"
    embedding.parent.mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}, str(embedding))
    vae = AutoencoderKL.from_pretrained(str(template_home / "models" / TINY / "vae"))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.5)
    state = vae_to_original(vae.state_dict(), dict(vae.config))
    save_file(
        {k.removeprefix(VAE_PREFIX): v.contiguous() for k, v in state.items()},
        str(tmp_path / "downloads" / "dim.safetensors"),
    )

    env = lorafleet_env(importer, redis_url, store)
    for kind, file in (("embeddings", embedding), ("vaes", tmp_path / "downloads" / "dim.safetensors")):
        result = run_cli([kind, "import", str(file)], env)
        assert result.returncode == 0 and "registered as" in result.stdout, result.stderr
    lora = importer / "autoimport" / "lora" / "watercolor.safetensors"
    refused = run_cli(["embeddings", "import", str(lora)], env)
    assert refused.returncode == 2 and "watercolor.safetensors is not a usable embedding" in refused.stderr

    with Client(Settings(home=submitter, broker_url=redis_url, storage_url=store)) as client:
        handle = client.submit(
            {"model": TINY, "prompt": "a lighthouse, glowstyle", "vae": "dim", "seed": 2, "steps": 2}
        )
        assert handle.job.embeddings == ["glowstyle"] and handle.job.vae == "dim"
        runner = make_runner(Settings(home=worker, broker_url=redis_url, storage_url=store))
        assert runner.run(handle.job_id) is JobStatus.succeeded, client.get(handle.job_id).error
        record = client.get(handle.job_id)
    text = Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).text["parameters"]
    assert f'TI hashes: "glowstyle: {hashlib.sha256(embedding.read_bytes()).hexdigest()[:10]}"' in text
    assert "VAE: dim.safetensors" in text
    assert not (worker / "autoimport" / "embedding").exists()  # fetched into the cache, not dropped in
    assert len(list((worker / "cache" / "loras").glob("*.safetensors"))) == 2
