# ruff: noqa: F811  (site is a fixture imported from test_lora_sources)
"""Importing a ControlNet, an upscaler, a VAE or an embedding from where people keep them: a
download link (a loopback server here) or a hub repo (huggingface_hub pointed at it through
HF_ENDPOINT), as LoRAs are; a refused download leaves nothing behind, and a folder is refused
saying what to do with it."""

from __future__ import annotations

import hashlib
import json

import pytest

from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_upscaler
from tests.conftest import TINY
from tests.helpers import lorafleet_env, run_cli
from tests.producer.test_lora_sources import leftovers, site  # noqa: F401, F811  (site: a fixture)

pytestmark = pytest.mark.slow


def test_a_controlnet_from_a_download_link_is_imported_registered_and_listed(  # noqa: F811
    settings, home, redis_url, site, tmp_path
):
    folder = make_tiny_controlnet(home / "models" / TINY, tmp_path / "canny")
    body = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    site.file("/files/77", body, **{"Content-Disposition": 'attachment; filename="canny_v11.safetensors"'})
    env = lorafleet_env(home, redis_url, settings.storage_url)
    digest = hashlib.sha256(body).hexdigest()
    result = run_cli(["controlnets", "import", f"{site.url}/files/77", "--sha256", digest], env)
    assert result.returncode == 0 and "registered as 'canny_v11'" in result.stdout, result.stderr
    assert (settings.controlnet_dir / "canny_v11.safetensors").read_bytes() == body
    listed = json.loads(run_cli(["controlnets", "list", "--json"], env).stdout)
    assert [row["sha256"] for row in listed if row["name"] == "canny_v11"] == [digest]
    site.file("/page", b"<html>sign in</html>", **{"Content-Type": "text/html"})
    refused = run_cli(["controlnets", "import", f"{site.url}/page", "--name", "nothing"], env)
    assert refused.returncode == 2 and "answered a web page" in refused.stderr
    assert not (settings.controlnet_dir / "nothing.safetensors").exists() and leftovers(home) == []
    a_folder = run_cli(["controlnets", "import", str(folder)], env)
    assert (
        a_folder.returncode == 2 and "is a folder" in a_folder.stderr and "on each machine" in a_folder.stderr
    )


def test_an_upscaler_from_a_hub_repo_is_named_after_the_repo_and_a_wrong_one_leaves_nothing(  # noqa: F811
    home, site, tmp_path
):
    upscaler = make_tiny_upscaler(tmp_path / "w.safetensors").read_bytes()
    site.hub_repo("people/4x-Tiny", {"diffusion_pytorch_model.safetensors": upscaler, "README.md": b"hi"})
    site.hub_repo(
        "people/not-an-upscaler",
        {"model.safetensors": (home / "autoimport" / "lora" / "watercolor.safetensors").read_bytes()},
    )
    env = lorafleet_env(
        home, None, HF_ENDPOINT=site.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1"
    )
    result = run_cli(["upscalers", "import", "people/4x-Tiny"], env)
    assert result.returncode == 0 and "imported upscaler 4x-Tiny" in result.stdout, result.stderr
    assert (home / "autoimport" / "upscaler" / "4x-Tiny.safetensors").read_bytes() == upscaler
    listed = json.loads(run_cli(["upscalers", "list", "--json"], env).stdout)
    assert [(row["name"], row["scale"]) for row in listed] == [("4x-Tiny", 4.0)]
    wrong = run_cli(["upscalers", "import", "people/not-an-upscaler"], env)
    assert wrong.returncode == 2 and "people/not-an-upscaler is not a usable upscaler" in wrong.stderr
    assert sorted(p.name for p in (home / "autoimport" / "upscaler").iterdir()) == ["4x-Tiny.safetensors"]
    assert leftovers(home) == []
