"""The embedded default: lorafleet starts a real Redis itself and later processes reuse it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.infra.embedded import EmbeddedRedis
from lorafleet.common.schema.settings import Settings


@pytest.fixture
def embedded(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    yield server
    server.stop()


def _server_pid(server: EmbeddedRedis) -> int:
    import redis

    return int(redis.Redis.from_url(server.url).info("server")["process_id"])


def test_no_broker_configured_starts_the_embedded_redis(tmp_path):
    settings = Settings(home=tmp_path / "home", broker_url=None)
    broker = resolve_broker(settings)
    try:
        assert broker.embedded and broker.url.startswith("unix://")
        assert broker.client().ping()
        assert broker.celery_url.startswith("redis+socket://")
        config = broker.client().config_get("appendonly")
        assert config["appendonly"] == "yes"
        assert (settings.redis_dir / "redis.pid").exists()
    finally:
        EmbeddedRedis(settings.redis_dir).stop()


@pytest.mark.slow  # a Python process
def test_a_second_process_finds_and_reuses_the_running_server(embedded):
    embedded.ensure_running()
    pid = _server_pid(embedded)
    code = (
        "from pathlib import Path; from lorafleet.common.infra.embedded import EmbeddedRedis; "
        f"print(EmbeddedRedis(Path({str(embedded.folder)!r})).ensure_running())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == embedded.url
    assert _server_pid(embedded) == pid


@pytest.mark.slow  # real processes
def test_processes_starting_at_once_share_one_server(embedded):
    code = (
        "from pathlib import Path; from lorafleet.common.infra.embedded import EmbeddedRedis; import redis; "
        f"e = EmbeddedRedis(Path({str(embedded.folder)!r})); e.ensure_running(); "
        "print(redis.Redis.from_url(e.url).info('server')['process_id'])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    pids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(pids) == 1 and pids != {""}


def test_data_survives_a_restart(embedded):
    import redis

    embedded.ensure_running()
    redis.Redis.from_url(embedded.url).rpush("queue", "job-1", "job-2")
    assert embedded.stop()
    assert not embedded.ping()
    embedded.ensure_running()
    assert redis.Redis.from_url(embedded.url).lrange("queue", 0, -1) == [b"job-1", b"job-2"]


def test_a_stale_socket_from_a_dead_server_is_replaced(embedded):
    embedded.folder.mkdir(parents=True)
    embedded.socket.write_text("left behind")
    embedded.ensure_running()
    assert embedded.ping()


def test_deep_home_folders_get_a_short_socket_path(tmp_path):
    deep = tmp_path.joinpath(*["nested-folder-name"] * 8)
    server = EmbeddedRedis(deep)
    assert len(str(server.socket)) < 100
    try:
        server.ensure_running()
        assert server.ping()
    finally:
        server.stop()


def test_the_short_socket_lives_in_a_folder_only_this_user_can_reach(tmp_path):
    import os
    import stat

    from lorafleet.common.infra.embedded import private_socket_folder
    from lorafleet.common.schema.errors import ConfigError

    folder = private_socket_folder(tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    folder.chmod(0o777)  # planted open to everyone: someone could swap the socket
    with pytest.raises(ConfigError, match="mode 0700"):
        private_socket_folder(tmp_path)
    folder.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a plain folder"):
        private_socket_folder(tmp_path)
