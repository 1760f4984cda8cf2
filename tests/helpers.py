"""Real processes for tests: redis-server, moto's S3 server, lorafleet workers.

Nothing here mocks a service: each helper starts the real program, waits until it answers,
and stops it (or kills it, when a test needs a crash).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lorafleet.common.embedded import redis_server_binary

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class RedisProcess:
    """A redis-server on a loopback TCP port, data (append-only) in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra or []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))

    def start(self) -> RedisProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--appendonly", "yes", "--save", "", *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._ping, what=f"redis-server on port {self.port}")
        return self

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                self.client().shutdown(nosave=True)
            except redis.ConnectionError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class MotoServer:
    """moto's S3-compatible HTTP server on a loopback port, in its own process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._up, what="moto_server")
        return self

    def _up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


def s3_env(endpoint: str) -> dict[str, str]:
    """Dummy credentials, as the standard AWS environment variables."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "LORAFLEET_S3_ENDPOINT_URL": endpoint,
    }


class WorkerProcess:
    """``lorafleet worker`` as a child process, its log in a file."""

    def __init__(self, env: dict[str, str], models: str, log: Path, name: str | None = None) -> None:
        self.env = env
        self.models = models
        self.log = log
        self.name = name
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> WorkerProcess:
        command = [str(BIN / "lorafleet"), "worker", "--models", self.models]
        if self.name:
            command += ["--name", self.name]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log, "ab")
        self.process = subprocess.Popen(
            command, env=self.env, stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait:
            wait_until(self._ready, timeout=90, interval=0.1, what=f"worker ready (log {self.log})")
        return self

    def _ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        return " ready." in self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM): the running job finishes first."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def kill(self) -> None:
        """kill -9: the worker dies mid-whatever, as on a machine crash."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close()

    def _close(self) -> None:
        handle = getattr(self, "_log_handle", None)
        if handle:
            handle.close()
            self._log_handle = None


def lorafleet_env(home: Path, broker_url: str | None, storage_url: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env["LORAFLEET_HOME"] = str(home)
    if broker_url:
        env["LORAFLEET_BROKER_URL"] = broker_url
    if storage_url:
        env["LORAFLEET_STORAGE_URL"] = storage_url
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "lorafleet"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
