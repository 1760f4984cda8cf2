"""One worker process per device, kept running: ``lorafleet worker --devices ...``.

A worker process drives one device (its pipelines live in that process). On a machine with
several GPUs, ``--devices all`` (or ``cuda:0,cuda:1``) starts one ``lorafleet worker`` child
per device, each with its own name (``NAME-<i>@HOST``) and heartbeat, restarts a child that
dies (after 1 s, doubling to at most a minute while it keeps dying young), and on SIGTERM or
SIGINT passes SIGTERM on to every child and waits: each finishes its current job first.

CPU children split the machine's cores between them (``OMP_NUM_THREADS``): two processes
that each use every core run several times slower together than one alone
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.common.schema.errors import BadArgument

logger = logging.getLogger(__name__)

FIRST_RESTART_DELAY = 1.0
"""Seconds before a child that died is started again; doubled while children die young."""
MAX_RESTART_DELAY = 60.0
YOUNG_SECONDS = 30.0
"""A child that dies sooner than this after its start counts as dying young."""


def parse_devices(text: str) -> list[str]:
    """``all``, or a comma-separated list of ``cpu``, ``cuda`` and ``cuda:N``."""
    if text.strip() == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise BadArgument(
                "all: this machine has no CUDA device", field="--devices", allowed="cpu,cpu (or cuda:N,...)"
            )
        return [f"cuda:{i}" for i in range(count)]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    for device in devices:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
            raise BadArgument(
                f"{device!r} is not a device",
                field="--devices",
                allowed="all, or a list of cpu, cuda, cuda:N",
            )
    if not devices:
        raise BadArgument("no device named", field="--devices", allowed="all, or a list of cpu, cuda, cuda:N")
    return devices


def default_base_name() -> str:
    return f"lorafleet-{os.getpid()}@{socket.gethostname()}"


def child_name(base: str, index: int) -> str:
    """``NAME@HOST`` -> ``NAME-<index>@HOST``."""
    name, at, host = base.partition("@")
    return f"{name}-{index}{at}{host}"


@dataclass
class _Child:
    device: str
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    delay: float = FIRST_RESTART_DELAY
    restarts: int = field(default=0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env)
        self.started = time.monotonic()
        logger.info("worker %s started on %s (pid %d)", self.name, self.device, self.process.pid)


class Supervisor:
    """Starts, watches and stops one worker child per device."""

    def __init__(
        self,
        devices: list[str],
        models: str,
        base_name: str,
        extra_args: list[str] | None = None,
        program: Path | None = None,
    ) -> None:
        program = program or Path(sys.executable).with_name("lorafleet")
        cpus = [d for d in devices if d == "cpu"]
        threads = max(1, (os.cpu_count() or 1) // max(1, len(cpus)))
        self.children = []
        for index, device in enumerate(devices):
            name = child_name(base_name, index)
            env = dict(os.environ, LORAFLEET_DEVICE=device)
            if device == "cpu":
                env.setdefault("OMP_NUM_THREADS", str(threads))
            command = [str(program), "worker", "--models", models, "--name", name, *(extra_args or [])]
            self.children.append(_Child(device, name, command, env))
        self._stopping = threading.Event()

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; then drain every child and return 0."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        for child in self.children:
            child.start()
        due: dict[str, float] = {}
        while not self._stopping.wait(0.2):
            for child in self.children:
                assert child.process is not None
                if child.name in due:
                    if time.monotonic() >= due[child.name]:
                        del due[child.name]
                        child.restarts += 1
                        child.start()
                    continue
                code = child.process.poll()
                if code is None:
                    continue
                lived = time.monotonic() - child.started
                child.delay = (
                    min(child.delay * 2, MAX_RESTART_DELAY) if lived < YOUNG_SECONDS else FIRST_RESTART_DELAY
                )
                logger.warning(
                    "worker %s on %s exited with %s after %.0f s; starting it again in %.0f s",
                    child.name,
                    child.device,
                    code,
                    lived,
                    child.delay,
                )
                due[child.name] = time.monotonic() + child.delay
        self.drain()
        return 0

    def drain(self) -> None:
        """SIGTERM to every child (each finishes its job), then wait for all of them."""
        logger.info("draining %d workers: each finishes its current job", len(self.children))
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.children:
            if child.process is not None:
                child.process.wait()
                logger.info("worker %s stopped", child.name)
