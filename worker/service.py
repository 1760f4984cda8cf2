"""Running a worker: one Celery worker process, one job at a time, pipelines kept hot.

``lorafleet worker --models A,B`` consumes the queues of models A and B with Celery's solo
pool (the job runs in the process that holds the pipelines; one process per GPU). SIGTERM
is Celery's warm shutdown: the running job finishes, then the worker exits.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_ready

from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRef, ModelRegistry
from lorafleet.common.catalog.shared_files import LoraRegistry
from lorafleet.common.fleet.queue import make_celery, worker_argv
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.workers import WorkerRegistry, alive_file
from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.errors import BadArgument, ModelError
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.loop import Background
from lorafleet.worker.heartbeat import Heartbeat
from lorafleet.worker.lora.files import DiskCache, LoraFiles
from lorafleet.worker.lora.store import LoraStore
from lorafleet.worker.pipelines import PipelineCache
from lorafleet.worker.run.runner import JobRunner
from lorafleet.worker.tasks import register_tasks

logger = logging.getLogger(__name__)


def default_node_name() -> str:
    return f"lorafleet-{os.getpid()}@{socket.gethostname()}"


class Worker:
    """Everything one worker process holds: the Celery app, the runner and its caches."""

    def __init__(self, settings: Settings, models: list[str], *, name: str | None = None) -> None:
        if not models:
            raise BadArgument("no model named", field="--models", allowed="NAME[,NAME...]")
        self.settings = settings
        self.name = name or default_node_name()
        self.broker = resolve_broker(settings)
        registry = ModelRegistry(settings, self.broker.client())
        self.models: list[ModelRef] = [self._model(registry, m) for m in models]
        self.app = make_celery(settings, self.broker)
        self.store = JobStore(self.broker.client(), retention=settings.record_retention)
        self.pipelines = PipelineCache(settings)
        storage = open_storage(settings)
        catalog = LoraCatalog(settings.lora_dir, LoraRegistry(self.store.redis))
        disk = DiskCache(settings.lora_disk_cache_folder, settings.lora_disk_cache_mb * 1024 * 1024)
        self.loras = LoraStore(
            LoraFiles(catalog, storage, disk),
            self.pipelines.device,
            settings.lora_device_cache_mb * 1024 * 1024,
        )
        self.runner = JobRunner(
            settings, self.store, storage, self.pipelines, self.loras, worker_name=self.name
        )
        self.runner.served = frozenset(m.key for m in self.models)
        register_tasks(self.app, self.runner)
        self.heartbeat = Heartbeat(
            WorkerRegistry(self.store.redis),
            self.name,
            [m.key for m in self.models],
            self.queues,
            self.runner,
            self.pipelines,
            self.loras,
            alive_file=alive_file(settings.home, self.name),
        )
        self.background = Background(
            settings,
            self.store,
            self.app,
            storage,
            own=lambda: (self.runner.instance, self.runner.running_ids()),
            orphans=self.runner.orphans,
        )
        worker_ready.connect(self._on_ready, weak=False)

    @staticmethod
    def _model(registry: ModelRegistry, name: str) -> ModelRef:
        try:
            return registry.get(name)
        except ModelError as exc:
            raise BadArgument(exc.reason, field="--models", allowed=exc.allowed) from None

    def _on_ready(self, **_: object) -> None:
        """Beat only once Celery consumes the queues: a live heartbeat means jobs are taken."""
        self.heartbeat.start()
        self.background.start()

    @property
    def queues(self) -> list[str]:
        return [m.queue for m in self.models]

    def preload(self) -> None:
        """Load every served model's pipeline now rather than on its first job."""
        for model in self.models[: self.pipelines.capacity]:
            self.pipelines.get(model)

    def run(self, loglevel: str = "INFO") -> None:
        logger.info(
            "worker %s serving %s on %s (%s), broker %s",
            self.name,
            ", ".join(m.key for m in self.models),
            self.pipelines.device,
            self.pipelines.dtype,
            self.broker.describe(),
        )
        try:
            self._consume(loglevel)
        finally:
            self.background.stop()
            self.heartbeat.stop()

    def _consume(self, loglevel: str) -> None:
        self.app.worker_main(worker_argv(self.name, self.queues, loglevel))
