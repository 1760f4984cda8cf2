"""The worker's heartbeat: a thread that tells Redis what this worker is doing, every 2 s,
and does nothing else (upkeep and the services loop have threads of their own,
common/services/loop.py), so nothing slow can delay a beat. Nothing stops the thread but
``stop``: an unexpected error is logged and the next beat comes on time."""

from __future__ import annotations

import logging
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import redis
import torch

from lorafleet.common import __version__
from lorafleet.common.fleet.workers import HEARTBEAT_SECONDS, WorkerBeat, WorkerRegistry
from lorafleet.worker.lora.store import LoraStore
from lorafleet.worker.pipelines import PipelineCache
from lorafleet.worker.run.runner import JobRunner

logger = logging.getLogger(__name__)


def _memory(device: torch.device) -> tuple[int | None, int | None]:
    """(used, total) bytes: the GPU's for CUDA, this process's resident set and the RAM else."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
    try:
        resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return resident, total
    except (OSError, ValueError):
        return None, None


class Heartbeat:
    """Beats until stopped; removes the worker from the registry when it stops cleanly."""

    def __init__(
        self,
        registry: WorkerRegistry,
        name: str,
        models: list[str],
        queues: list[str],
        runner: JobRunner,
        pipelines: PipelineCache,
        loras: LoraStore,
        interval: float = HEARTBEAT_SECONDS,
        alive_file: Path | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.models = models
        self.queues = queues
        self.runner = runner
        self.pipelines = pipelines
        self.loras = loras
        self.interval = interval
        self.alive_file = alive_file
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-heartbeat", daemon=True)

    def snapshot(self) -> WorkerBeat:
        stats = self.runner.stats
        used, total = _memory(self.pipelines.device)
        switches = list(stats.switch_seconds)
        lookups = stats.lora_hits + stats.lora_misses
        return WorkerBeat(
            name=self.name,
            instance=self.runner.instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            device=f"{self.pipelines.device} ({str(self.pipelines.dtype).replace('torch.', '')})",
            device_memory_used=used,
            device_memory_total=total,
            models=self.models,
            queues=self.queues,
            hot_pipelines=[h.model.key for h in self.pipelines.loaded()],
            cached_loras=self.loras.cached_names(),
            current_job=stats.current_job,
            current_step=stats.current_step,
            current_total=stats.current_total,
            jobs_done=stats.done,
            jobs_failed=stats.failed,
            jobs_cancelled=stats.cancelled,
            lora_hits=stats.lora_hits,
            lora_misses=stats.lora_misses,
            lora_hit_rate=stats.lora_hits / lookups if lookups else None,
            switch_p50=statistics.median(switches) if switches else None,
            max_batch=self.runner.batch_limit(),
            started_at=self.started_at,
            last_seen=time.time(),
        )

    def beat(self) -> None:
        try:
            self.registry.beat(self.snapshot())
        except (redis.RedisError, OSError) as exc:
            logger.warning("heartbeat not written: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._touch()
                self.beat()
            except OSError as exc:
                logger.warning("alive file not touched: %s", exc)
            except Exception:  # the thread must outlive anything: a dead heartbeat looks like a dead worker
                logger.exception("heartbeat: unexpected error; beating on")
            self._stop.wait(self.interval)

    def _touch(self) -> None:
        if self.alive_file is not None:
            self.alive_file.parent.mkdir(parents=True, exist_ok=True)
            self.alive_file.touch()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)
        try:
            self.registry.remove(self.name)
        except (redis.RedisError, OSError):
            pass
        if self.alive_file is not None:
            self.alive_file.unlink(missing_ok=True)
