"""Hot pipelines: each base model loaded once per worker process and reused by every job.

A worker keeps the pipelines of the models it serves in memory, least recently used first
out when a new one would not fit ``max_pipelines`` (never the one in use). Each pipeline
comes with the WeightPatcher that owns its adaptable weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from lorafleet.common.errors import JobFailed
from lorafleet.common.models import FAMILY_BY_PIPELINE, ModelRef
from lorafleet.common.settings import Settings
from lorafleet.worker.module_index import COMPONENTS
from lorafleet.worker.patcher import WeightPatcher

logger = logging.getLogger(__name__)

# Workers log one line per pipeline load; the libraries' own progress bars only add noise.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


def pick_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA and float32 on the CPU."""
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


@dataclass
class HotPipeline:
    """A loaded pipeline, its patcher, and what the scheduler is rebuilt from per job."""

    model: ModelRef
    pipe: object
    patcher: WeightPatcher
    family: str
    scheduler_config: dict
    load_seconds: float
    in_use: bool = field(default=False)

    @property
    def nbytes(self) -> int:
        total = 0
        for name in ("unet", "vae", *COMPONENTS[1:]):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                total += sum(p.nbytes for p in module.parameters())
        return total + self.patcher.pristine_bytes


def _pipeline_class(model: ModelRef) -> str:
    if model.path is None:
        return ""
    try:
        return json.loads((model.path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return ""


def load_pipeline(model: ModelRef, device: torch.device, dtype: torch.dtype) -> HotPipeline:
    """Load a diffusers pipeline (offline for local folders) and wrap it for jobs."""
    start = time.perf_counter()
    class_name = _pipeline_class(model)
    extra: dict = {}
    if class_name == "StableDiffusionPipeline":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    elif class_name == "StableDiffusionXLPipeline":
        extra = {"add_watermarker": False}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            model.source, dtype=dtype, local_files_only=model.path is not None, **extra
        )
    except (OSError, ValueError, EnvironmentError) as exc:
        raise JobFailed(f"model {model.key!r} cannot be loaded from {model.source}: {exc}") from exc
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    components = {
        name: getattr(pipe, name)
        for name in COMPONENTS
        if isinstance(getattr(pipe, name, None), torch.nn.Module)
    }
    family = model.family or FAMILY_BY_PIPELINE.get(type(pipe).__name__, "unknown")
    hot = HotPipeline(
        model=model,
        pipe=pipe,
        patcher=WeightPatcher(components),
        family=family,
        scheduler_config=dict(pipe.scheduler.config),
        load_seconds=time.perf_counter() - start,
    )
    logger.info("pipeline loaded: %s (%s) on %s in %.2f s", model.key, family, device, hot.load_seconds)
    return hot


class PipelineCache:
    """Hot pipelines by model key, at most ``capacity`` of them."""

    def __init__(self, settings: Settings, capacity: int = 2) -> None:
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self.capacity = capacity
        self._hot: OrderedDict[str, HotPipeline] = OrderedDict()

    def loaded(self) -> list[HotPipeline]:
        return list(self._hot.values())

    def get(self, model: ModelRef) -> tuple[HotPipeline, float]:
        """The model's pipeline and the seconds spent loading it (0 when it was hot)."""
        hot = self._hot.get(model.key)
        if hot is not None:
            self._hot.move_to_end(model.key)
            return hot, 0.0
        self._make_room()
        hot = load_pipeline(model, self.device, self.dtype)
        self._hot[model.key] = hot
        return hot, hot.load_seconds

    def _make_room(self) -> None:
        while len(self._hot) >= self.capacity:
            victim = next((k for k, h in self._hot.items() if not h.in_use), None)
            if victim is None:
                return
            del self._hot[victim]
            logger.info("pipeline evicted: %s", victim)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
