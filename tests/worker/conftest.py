"""Worker-side fixtures: the tiny pipeline loaded in this process, a runner without Celery."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.heartbeat import Heartbeat
from lorafleet.worker.lora.files import LoraFiles
from lorafleet.worker.lora.store import LoraStore
from lorafleet.worker.pipelines import PipelineCache, load_pipeline
from lorafleet.worker.run.runner import JobRunner
from tests.conftest import TINY
from tests.helpers import RUNNER_HEARTBEATS


@pytest.fixture(scope="module")
def hot(template_home):
    """The tiny SD1.5 pipeline, loaded once per module (tests must leave it pristine)."""
    model = ModelRegistry(Settings(home=template_home)).get(TINY)
    return load_pipeline(model, torch.device("cpu"), torch.float32)


def snapshot(hot) -> dict[str, torch.Tensor]:
    """Every adaptable weight of the pipeline, copied."""
    return {
        f"{name}:{key}": value.detach().clone()
        for name, module in hot.patcher.components.items()
        for key, value in module.state_dict().items()
    }


def assert_same(hot, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(hot)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} tensors differ from pristine, e.g. {changed[:3]}"


def dropped_in(
    settings: Settings,
    *,
    models: Iterable[Path] = (),
    loras: Iterable[Path] = (),
    checkpoints: Iterable[Path] = (),
    checkpoint_configs: dict[str, str] | None = None,
) -> Settings:
    """``settings`` (conftest's) with files dropped into its home: pipeline folders into
    models/ by their own names, LoRA files into the LoRA drop folder, single-file checkpoints
    into autoimport/main; ``checkpoint_configs`` as LORAFLEET_CHECKPOINT_CONFIGS gives them."""
    for folder in models:
        shutil.copytree(folder, settings.models_dir / folder.name)
    for target, files in ((settings.lora_dir, loras), (settings.checkpoints_dir, checkpoints)):
        for path in files:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
    if checkpoint_configs:
        settings = settings.model_copy(update={"checkpoint_configs": checkpoint_configs})
    return settings


def make_runner(settings) -> JobRunner:
    """A JobRunner on real Redis and storage, without Celery (the task only calls run)."""
    import redis

    pipelines = PipelineCache(settings)
    store = JobStore(redis.Redis.from_url(settings.broker_url), retention=settings.record_retention)
    loras = LoraStore(
        LoraFiles(LoraCatalog(settings.lora_dir), None, None), pipelines.device, 256 * 1024 * 1024
    )
    runner = JobRunner(settings, store, open_storage(settings), pipelines, loras, worker_name="test-worker")
    # a live worker's heartbeat (its own connection: round-trip counts see only the runner's),
    # until the test ends (tests/conftest.py stops it): an API's upkeep in the same test hands
    # the jobs of a silent worker back, and one beat went stale while a loaded machine ran a job
    heartbeat = Heartbeat(
        WorkerRegistry(redis.Redis.from_url(settings.broker_url)),
        runner.worker_name,
        [],
        [],
        runner,
        pipelines,
        loras,
    )
    heartbeat.beat()
    heartbeat.start()
    RUNNER_HEARTBEATS.append(heartbeat)
    return runner


@pytest.fixture
def runner(settings):
    return make_runner(settings)
