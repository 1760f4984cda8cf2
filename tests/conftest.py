"""Shared fixtures: a real redis-server, a tiny offline model with demo LoRAs, settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorafleet.common.schema.settings import Settings
from tests.helpers import RUNNER_HEARTBEATS, MotoServer, RedisProcess

TINY = "tiny-sd15"
TINY_XL = "tiny-sdxl"
TINY_SD2 = "tiny-sd2"


@pytest.fixture(autouse=True)
def _runner_heartbeats_stop():
    """A runner's heartbeat beats for its test only (``make_runner`` starts it)."""
    yield
    while RUNNER_HEARTBEATS:
        RUNNER_HEARTBEATS.pop().stop()


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_proc) -> str:
    """A clean Redis for this test (the session's server, flushed)."""
    redis_proc.client().flushall()
    return redis_proc.url


@pytest.fixture(scope="session")
def template_home(tmp_path_factory) -> Path:
    """A lorafleet home with tiny sd15, sd2 and sdxl pipelines and the demo LoRAs (built once)."""
    from lorafleet.worker.tiny import make_demo_loras, make_tiny_model

    home = tmp_path_factory.mktemp("template-home")
    make_tiny_model(home / "models" / TINY, family="sd15")
    make_tiny_model(home / "models" / TINY_XL, family="sdxl")
    make_tiny_model(home / "models" / TINY_SD2, family="sd2")
    make_demo_loras(home / "models" / TINY, home / "autoimport" / "lora")
    make_demo_loras(home / "models" / TINY_XL, home / "xl-loras")
    return home


def copy_home(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


@pytest.fixture
def home(template_home, tmp_path) -> Path:
    """This test's own copy of the template home (it may add or break files freely)."""
    return copy_home(template_home, tmp_path / "home")


@pytest.fixture
def settings(home, redis_url, tmp_path) -> Settings:
    return Settings(
        home=home,
        broker_url=redis_url,
        storage_url=str(tmp_path / "outputs"),
        api_allowed_hosts="testserver",  # FastAPI's TestClient sends Host: testserver
    )


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_credentials(monkeypatch, moto_server):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    return moto_server
