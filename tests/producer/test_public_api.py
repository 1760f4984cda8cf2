"""The producer's public surface, and the promise that it never needs torch."""

from __future__ import annotations

import subprocess
import sys

import tomllib

import lorafleet.producer
from tests.helpers import REPO

PUBLIC = [
    "Client",
    "ConfigError",
    "GenerationJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobRecord",
    "JobRejected",
    "JobStatus",
    "LoraSpec",
    "LorafleetError",
    "Priority",
    "Sampler",
    "Settings",
    "TransientError",
]

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "safetensors", "accelerate"):
            raise ImportError(f"the producer imported {name}")
sys.meta_path.insert(0, Block())
"""


def test_public_api_is_pinned():
    assert sorted(lorafleet.producer.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(lorafleet.producer, name) is not None


def test_producer_side_imports_and_runs_without_torch(settings, tmp_path):
    code = (
        BLOCK_TORCH
        + f"""
import lorafleet.producer, lorafleet.producer.cli
from lorafleet.producer import Client, Settings
from pathlib import Path
client = Client(Settings(home=Path({str(settings.home)!r}), broker_url={settings.broker_url!r}))
handle = client.submit({{"model": "tiny-sd15", "prompt": "x", "loras": [{{"name": "watercolor"}}]}})
print(client.get(handle.job_id).status.value)
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "queued"


def test_worker_commands_say_how_to_install_the_worker_side():
    code = (
        BLOCK_TORCH
        + """
import sys
from lorafleet.producer.cli import app
sys.argv = ["lorafleet", "make-tiny-model", "/tmp/nowhere"]
app()
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3
    assert "pip install 'lorafleet[worker]'" in result.stderr


def test_base_dependencies_leave_out_the_worker_side():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    heavy = ("torch", "diffusers", "transformers", "safetensors", "accelerate")
    assert not [
        d for d in project["dependencies"] if d.split("[")[0].split(">")[0].split("=")[0].strip() in heavy
    ]
    assert {d.split(">")[0] for d in project["optional-dependencies"]["worker"]} >= set(heavy)
    assert project["scripts"] == {"lorafleet": "lorafleet.producer.cli:main"}
