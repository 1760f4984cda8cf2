"""Hot pipelines: each base model loaded once per worker process and reused by every job.

A worker keeps the pipelines of the models it serves in memory, least recently used first
out when a new one would not fit (``max_pipelines``, ``pipeline_memory_mb``), never the one
in use. Each pipeline comes with the WeightPatcher that owns its adaptable weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from lorafleet.common.errors import JobFailed
from lorafleet.common.lora_catalog import read_safetensors_header
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


def pipeline_bytes(model: ModelRef, dtype: torch.dtype) -> int:
    """The weights a pipeline folder will occupy at ``dtype``, from its safetensors headers."""
    if model.path is None:
        return 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in model.path.glob("*/*.safetensors"):
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError):
            continue
        for tensor in header.tensors.values():
            count = 1
            for size in tensor.shape:
                count *= size
            total += count * itemsize
    return total


def default_budget(device: torch.device) -> int:
    """Bytes for hot pipelines when the setting is 0: 85% of a GPU, no limit on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.85)
    return 0


class PipelineCache:
    """Hot pipelines by model key: at most ``capacity`` of them within ``budget_bytes``.

    The least recently used pipeline goes first when a new one would not fit, never the one
    in use; a budget of 0 means no byte limit. A pipeline's size counts its weights and the
    pristine copies its patcher keeps.
    """

    def __init__(self, settings: Settings, capacity: int | None = None) -> None:
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self.capacity = capacity or settings.max_pipelines
        budget = settings.pipeline_memory_mb * 1024 * 1024
        self.budget_bytes = budget or default_budget(self.device)
        self._hot: OrderedDict[str, HotPipeline] = OrderedDict()
        self.loads = 0

    def loaded(self) -> list[HotPipeline]:
        return list(self._hot.values())

    @property
    def used_bytes(self) -> int:
        return sum(h.nbytes for h in self._hot.values())

    def get(self, model: ModelRef) -> tuple[HotPipeline, float]:
        """The model's pipeline and the seconds spent loading it (0 when it was hot)."""
        hot = self._hot.get(model.key)
        if hot is not None:
            self._hot.move_to_end(model.key)
            return hot, 0.0
        self._make_room(pipeline_bytes(model, self.dtype))
        hot = load_pipeline(model, self.device, self.dtype)
        self._hot[model.key] = hot
        self.loads += 1
        return hot, hot.load_seconds

    def trim(self) -> None:
        """Evict idle pipelines while the hot ones exceed the budget (pristine copies grow)."""
        self._make_room(0, count_new=False)

    def _over(self, incoming: int, count_new: bool) -> bool:
        if len(self._hot) + (1 if count_new else 0) > self.capacity:
            return True
        return bool(self.budget_bytes) and self.used_bytes + incoming > self.budget_bytes

    def _make_room(self, incoming: int, count_new: bool = True) -> None:
        while self._hot and self._over(incoming, count_new):
            victim = next((k for k, h in self._hot.items() if not h.in_use), None)
            if victim is None:
                return
            del self._hot[victim]
            logger.info("pipeline evicted: %s", victim)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def empty_components(folder: Path, family: str | None) -> dict[str, torch.nn.Module]:
    """A pipeline folder's UNet and text encoders on the meta device: shapes, no weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        components = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet"))),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))),
        }
        if family == "sdxl" and (folder / "text_encoder_2").is_dir():
            components["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
            )
    return components
