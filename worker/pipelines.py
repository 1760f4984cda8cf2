"""Hot pipelines: each base model loaded once per worker process and reused by every job.

A worker keeps the pipelines of the models it serves in memory, least recently used first
out when a new one would not fit (``max_pipelines``, ``pipeline_memory_mb``), never the one
in use. Each pipeline comes with the WeightPatcher that owns its adaptable weights.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from lorafleet.common.errors import FileRefused, JobFailed
from lorafleet.common.family import Family
from lorafleet.common.loras.files import read_safetensors_header
from lorafleet.common.models import ModelRef
from lorafleet.common.settings import Settings
from lorafleet.worker.lru import LRUCache
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
    scheduler_config: dict
    load_seconds: float

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
    hot = HotPipeline(
        model=model,
        pipe=pipe,
        patcher=WeightPatcher(components),
        scheduler_config=dict(pipe.scheduler.config),
        load_seconds=time.perf_counter() - start,
    )
    family = model.family.value if model.family else "family unknown"
    logger.info("pipeline loaded: %s (%s) on %s in %.2f s", model.key, family, device, hot.load_seconds)
    return hot


def pipeline_bytes(model: ModelRef, dtype: torch.dtype) -> int:
    """The weights a pipeline folder will occupy at ``dtype``, from its safetensors headers."""
    if model.path is None:
        return 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in model.path.glob("*/*.safetensors"):
        try:
            header = read_safetensors_header(path, max_bytes=2**40)
        except (OSError, FileRefused):
            continue  # from_pretrained will say what is wrong with it
        total += sum(math.prod(tensor.shape) for tensor in header.tensors.values()) * itemsize
    return total


def default_budget(device: torch.device) -> int:
    """Bytes for hot pipelines when the setting is 0: 85% of a GPU, no limit on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.85)
    return 0


class PipelineCache:
    """Hot pipelines by model key: at most ``capacity`` of them within ``budget_bytes``.

    The least recently used pipeline goes first when a new one would not fit, never the one
    in use (pinned while a job runs on it, see ``using``); a budget of 0 means no byte
    limit. A pipeline's size counts its weights and the pristine copies its patcher keeps.
    """

    def __init__(self, settings: Settings, capacity: int | None = None) -> None:
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        budget = settings.pipeline_memory_mb * 1024 * 1024
        self._hot: LRUCache[str, HotPipeline] = LRUCache(
            max_items=capacity or settings.max_pipelines,
            max_bytes=budget or default_budget(self.device),
            size=lambda hot: hot.nbytes,
            on_evict=self._evicted,
        )
        self.loads = 0

    @property
    def capacity(self) -> int:
        return self._hot.max_items

    @property
    def budget_bytes(self) -> int:
        return self._hot.max_bytes

    def loaded(self) -> list[HotPipeline]:
        return self._hot.values()

    @property
    def used_bytes(self) -> int:
        return self._hot.used_bytes

    def get(self, model: ModelRef) -> tuple[HotPipeline, float]:
        """The model's pipeline and the seconds spent loading it (0 when it was hot)."""
        hot = self._hot.get(model.key)
        if hot is not None:
            return hot, 0.0
        self._hot.make_room(pipeline_bytes(model, self.dtype), incoming_items=1)
        hot = load_pipeline(model, self.device, self.dtype)
        self._hot.put(model.key, hot)
        self.loads += 1
        return hot, hot.load_seconds

    @contextmanager
    def using(self, hot: HotPipeline) -> Iterator[HotPipeline]:
        """Pin ``hot`` while a job runs on it; afterwards trim the cache to its budget."""
        self._hot.pin(hot.model.key)
        try:
            yield hot
        finally:
            self._hot.unpin(hot.model.key)
            self.trim()

    def trim(self) -> None:
        """Evict idle pipelines while the hot ones exceed the budget (pristine copies grow)."""
        self._hot.make_room()

    def _evicted(self, key: str, hot: HotPipeline) -> None:
        logger.info("pipeline evicted: %s", key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def empty_components(folder: Path, family: Family | None) -> dict[str, torch.nn.Module]:
    """A pipeline folder's UNet and text encoders on the meta device: shapes, no weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        components = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet"))),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))),
        }
        if family is Family.sdxl and (folder / "text_encoder_2").is_dir():
            components["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
            )
    return components
