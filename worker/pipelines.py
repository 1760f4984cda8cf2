"""Hot pipelines: each base model loaded once per worker process and reused by every job.

A worker keeps the pipelines of the models it serves in memory, least recently used first
out when a new one would not fit (``max_pipelines``, ``pipeline_memory_mb``), never the one
in use. Each pipeline comes with the WeightPatcher that owns its adaptable weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from lorafleet.common.catalog.checkpoints import short_hash
from lorafleet.common.catalog.lora_files import read_safetensors_header
from lorafleet.common.catalog.models import ModelRef
from lorafleet.common.schema.errors import FileRefused, JobFailed
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.lora.module_index import COMPONENTS, TEXT_ENCODERS
from lorafleet.worker.lora.patcher import WeightPatcher
from lorafleet.worker.lru import LRUCache

logger = logging.getLogger(__name__)

# Workers log one line per pipeline load; the libraries' own progress bars only add noise.
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


def pick_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device, family: Family | None = None) -> torch.dtype:
    """``auto`` is float16 on CUDA (bfloat16 for the flow families) and float32 on the CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if family is not None and family.is_flow else torch.float16
    return getattr(torch, setting)


@dataclass
class HotPipeline:
    """A loaded pipeline, its patcher, and what the scheduler is rebuilt from per job."""

    model: ModelRef
    pipe: object
    patcher: WeightPatcher
    scheduler_config: dict
    load_seconds: float
    model_hash: str | None = None
    """A1111's short hash of a checkpoint file (None for folders and hub models)."""

    @property
    def modules(self) -> tuple[str, ...]:
        """What a transformer-only checkpoint runs with besides itself: its base, by name."""
        if (
            self.model.single_file
            and self.model.family is not None
            and self.model.family.is_flow
            and self.model.config
        ):
            return (
                Path(self.model.config).name if Path(self.model.config).is_absolute() else self.model.config,
            )
        return ()

    @property
    def nbytes(self) -> int:
        """What the pipeline holds on its device: every component's weights there (text encoders
        and VAE included; not those kept on the CPU by LORAFLEET_TEXT_ENCODER_DEVICE) and the
        pristine copies there (not those in host memory: LORAFLEET_PRISTINE_DEVICE)."""
        modules = {id(m): m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)}
        denoiser = getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)
        device = next(denoiser.parameters()).device if isinstance(denoiser, torch.nn.Module) else None
        total = sum(
            p.nbytes
            for module in modules.values()
            for p in module.parameters()
            if device is None or p.device == device
        )
        return total + self.patcher.pristine_bytes_on(device)


PIPELINE_CLASS = {family: family.traits.pipeline for family in Family}
"""The diffusers pipeline a single-file checkpoint of each family becomes."""


INPAINTING_CLASS = {
    Family.sd15: "StableDiffusionInpaintPipeline",
    Family.sd2: "StableDiffusionInpaintPipeline",
    Family.sdxl: "StableDiffusionXLInpaintPipeline",
}
"""The pipeline an inpainting checkpoint (a 9-channel UNet) of each family becomes."""


def _pipeline_class(model: ModelRef) -> str:
    if model.single_file:
        if model.inpainting and model.family is not None:
            return INPAINTING_CLASS.get(model.family, "")
        return PIPELINE_CLASS.get(model.family, "") if model.family else ""
    if model.path is None:
        return ""
    try:
        return json.loads((model.path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return ""


def _options(class_name: str) -> dict:
    """What lorafleet leaves out of every pipeline: the safety checker, the watermark."""
    if class_name in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if class_name in ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"):
        return {"add_watermarker": False}
    return {}


def converted_folder(model: ModelRef, dtype: torch.dtype, root: Path) -> Path:
    """Where a checkpoint's diffusers copy lives: one per file version (path, size, mtime) and dtype."""
    assert model.path is not None
    stat = model.path.stat()
    stamp = f"{model.path}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}:{model.config}"
    return root / hashlib.sha256(stamp.encode()).hexdigest()[:24]


def _load_checkpoint(model: ModelRef, dtype: torch.dtype, converted_root: Path | None):
    """A single-file checkpoint's pipeline: from its converted copy when this worker made one
    before, else with diffusers' single-file loader (then saved as that copy)."""
    import diffusers

    class_name = _pipeline_class(model)
    if not class_name or model.path is None:
        raise JobFailed(f"model {model.key!r}: {model.source} is a checkpoint of unknown family")
    if model.family is not None and model.family.is_flow:
        return _load_flow_checkpoint(model, class_name, dtype)
    converted = converted_folder(model, dtype, converted_root) if converted_root else None
    if converted is not None and (converted / "lorafleet.json").is_file():
        try:
            pipe = DiffusionPipeline.from_pretrained(
                str(converted), dtype=dtype, local_files_only=True, **_options(class_name)
            )
            return pipe, json.loads((converted / "lorafleet.json").read_text()).get("model_hash")
        except (OSError, ValueError, KeyError) as exc:  # a damaged copy; out of memory is not one
            logger.warning(
                "converted copy %s of %s is unusable (%s); converting again", converted, model.path, exc
            )
            shutil.rmtree(converted, ignore_errors=True)
    local_config = Path(str(model.config)).is_absolute()
    try:
        pipe = getattr(diffusers, class_name).from_single_file(
            str(model.path),
            config=model.config,
            local_files_only=local_config,
            torch_dtype=dtype,
            **_options(class_name),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise JobFailed(
            f"model {model.key!r}: the checkpoint {model.path.name} could not be loaded with the configs of "
            f"{model.config} ({type(exc).__name__}: {exc}); check that --config is a {model.family} "
            "diffusers folder or hub id"
        ) from exc
    if model.prediction_type and pipe.scheduler.config.get("prediction_type") != model.prediction_type:
        pipe.scheduler = pipe.scheduler.__class__.from_config(
            pipe.scheduler.config, prediction_type=model.prediction_type
        )
    model_hash = short_hash(model.path)
    if converted is not None:
        _save_converted(pipe, converted, {"source": str(model.path), "model_hash": model_hash})
    return pipe, model_hash


def _load_flow_checkpoint(model: ModelRef, class_name: str, dtype: torch.dtype):
    """A transformer-only checkpoint of a flow family, the rest of the pipeline from its base
    (``model.config``). Not kept converted: the conversion is a renaming and a split by rows."""
    from lorafleet.worker.flow_checkpoints import load_flow_checkpoint

    assert model.path is not None
    if not model.config:
        raise JobFailed(
            f"model {model.key!r}: the checkpoint {model.path.name} holds the transformer only and names no "
            "base for its text encoders and VAE (models add --base, or LORAFLEET_CHECKPOINT_CONFIGS)"
        )
    local = Path(str(model.config)).is_absolute()
    load = load_flow_checkpoint
    if model.quantized:
        from lorafleet.worker.gguf_checkpoints import load_gguf_checkpoint as load
    try:
        pipe = load(model.path, model.config, class_name, dtype, local)
    except (OSError, ValueError, KeyError) as exc:
        raise JobFailed(
            f"model {model.key!r}: the checkpoint {model.path.name} could not be loaded on the base "
            f"{model.config} ({type(exc).__name__}: {exc}); check that the base is a {model.family} folder"
        ) from exc
    return pipe, short_hash(model.path)


def _save_converted(pipe, folder: Path, note: dict) -> None:
    """Save the converted pipeline next to the others, whole or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}")
    try:
        pipe.save_pretrained(str(partial), safe_serialization=True)
        (partial / "lorafleet.json").write_text(json.dumps(note))
        os.replace(partial, folder)
        logger.info("checkpoint %s converted and kept as %s", note["source"], folder)
    except OSError as exc:  # a full disk costs the next load its speed, not this job
        logger.warning("converted copy of %s not kept: %s", note["source"], exc)
        shutil.rmtree(partial, ignore_errors=True)


def sweep_partial_copies(root: Path) -> None:
    """Remove the half-written converted copies of worker processes that are gone."""
    if not root.is_dir():
        return
    for partial in root.glob(".*.*"):
        pid = partial.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
            logger.info("removed %s, a converted copy its worker never finished", partial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is someone else's
        pass
    return True


def load_pipeline(
    model: ModelRef,
    device: torch.device,
    dtype: torch.dtype,
    converted_root: Path | None = None,
    *,
    text_encoder_device: torch.device | None = None,
    pristine_device: torch.device | None = None,
) -> HotPipeline:
    """Load a pipeline (offline for local folders and checkpoints) and wrap it for jobs:
    on ``device``, its text encoders on ``text_encoder_device`` when given, the pristine
    copies of LoRA-touched weights on ``pristine_device`` when given."""
    start = time.perf_counter()
    model_hash = None
    if model.single_file:
        pipe, model_hash = _load_checkpoint(model, dtype, converted_root)
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(
                model.source,
                dtype=dtype,
                local_files_only=model.path is not None,
                **_options(_pipeline_class(model)),
            )
        except (OSError, ValueError, EnvironmentError) as exc:
            raise JobFailed(f"model {model.key!r} cannot be loaded from {model.source}: {exc}") from exc
    pipe.to(device)
    if text_encoder_device is not None and text_encoder_device != device:
        for name in TEXT_ENCODERS:
            if isinstance(getattr(pipe, name, None), torch.nn.Module):
                getattr(pipe, name).to(text_encoder_device)
    pipe.set_progress_bar_config(disable=True)
    components = {
        name: getattr(pipe, name)
        for name in COMPONENTS
        if isinstance(getattr(pipe, name, None), torch.nn.Module)
    }
    hot = HotPipeline(
        model=model,
        pipe=pipe,
        patcher=WeightPatcher(components, pristine_device),
        scheduler_config=dict(pipe.scheduler.config),
        load_seconds=time.perf_counter() - start,
        model_hash=model_hash,
    )
    family = model.family.value if model.family else "family unknown"
    logger.info("pipeline loaded: %s (%s) on %s in %.2f s", model.key, family, device, hot.load_seconds)
    return hot


def pipeline_bytes(model: ModelRef, dtype: torch.dtype) -> int:
    """The weights a pipeline will occupy at ``dtype``, from its safetensors headers."""
    if model.path is None:
        return 0
    files = [model.path] if model.single_file else list(model.path.glob("*/*.safetensors"))
    base = (
        Path(str(model.config))
        if model.single_file and model.family is not None and model.family.is_flow
        else None
    )
    if base is not None and base.is_absolute() and base.is_dir():  # the base's text encoders and VAE
        files += [p for p in base.glob("*/*.safetensors") if p.parent.name != "transformer"]
    total = weights_bytes(files, dtype)
    if model.quantized and model.path.is_file():  # a GGUF file stays its size in memory
        total += model.path.stat().st_size
    return total


def weights_bytes(files: list[Path], dtype: torch.dtype) -> int:
    """The bytes the tensors of these safetensors files take at ``dtype`` (read from headers)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in files:
        try:
            header = read_safetensors_header(path, max_bytes=2**40)
        except (OSError, FileRefused):
            continue  # loading will say what is wrong with it
        total += sum(math.prod(tensor.shape) for tensor in header.tensors.values()) * itemsize
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


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

    The add-on models jobs bring (ControlNets, T2I-Adapters, upscalers) live in caches made by
    ``add_on_cache`` and count against the same budget: room for one, or for a pipeline, is
    made by evicting the least recently used add-ons first, then idle pipelines.
    """

    def __init__(self, settings: Settings, capacity: int | None = None) -> None:
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self._dtype_setting = settings.dtype
        self.text_encoder_device = (
            torch.device(settings.text_encoder_device) if settings.text_encoder_device else None
        )
        self.pristine_device = torch.device(settings.pristine_device) if settings.pristine_device else None
        self.converted_root = settings.converted_dir
        sweep_partial_copies(self.converted_root)
        budget = settings.pipeline_memory_mb * 1024 * 1024
        self._budget = budget or default_budget(self.device)
        self._hot: LRUCache[str, HotPipeline] = LRUCache(
            max_items=capacity or settings.max_pipelines,
            max_bytes=self._budget,
            size=lambda hot: hot.nbytes,
            on_evict=self._evicted,
        )
        self._add_ons: list[LRUCache[str, torch.nn.Module]] = []
        self.loads = 0

    @property
    def capacity(self) -> int:
        return self._hot.max_items

    @property
    def budget_bytes(self) -> int:
        return self._budget

    def loaded(self) -> list[HotPipeline]:
        return self._hot.values()

    @property
    def used_bytes(self) -> int:
        """Bytes of the hot pipelines and of the add-on models kept beside them."""
        return self._hot.used_bytes + self._add_on_bytes()

    def _add_on_bytes(self) -> int:
        return sum(cache.used_bytes for cache in self._add_ons)

    def add_on_cache(self, capacity: int) -> LRUCache[str, torch.nn.Module]:
        """A cache of at most ``capacity`` add-on models whose bytes count against this
        cache's budget; put an entry only after ``make_room_for`` its bytes."""
        cache: LRUCache[str, torch.nn.Module] = LRUCache(max_items=capacity, size=module_bytes)
        self._add_ons.append(cache)
        return cache

    def make_room_for(self, nbytes: int) -> None:
        """Evict the least recently used add-ons, then idle pipelines, until ``nbytes`` more fit."""
        self._fit(nbytes)

    def get(self, model: ModelRef) -> tuple[HotPipeline, float]:
        """The model's pipeline and the seconds spent loading it (0 when it was hot)."""
        hot = self._hot.get(model.key)
        if hot is not None:
            return hot, 0.0
        dtype = pick_dtype(self._dtype_setting, self.device, model.family)
        self._fit(pipeline_bytes(model, dtype), incoming_items=1)
        hot = load_pipeline(
            model,
            self.device,
            dtype,
            self.converted_root,
            text_encoder_device=self.text_encoder_device,
            pristine_device=self.pristine_device,
        )
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
        """Evict add-ons, then idle pipelines, while they exceed the budget (pristine copies grow)."""
        self._fit(0)

    def _fit(self, incoming_bytes: int, incoming_items: int = 0) -> None:
        """Add-ons out first (the least recently used: a ControlNet reloads in a fraction of a
        pipeline's time), then idle pipelines, until the hot pipelines, the add-ons and what
        comes fit the budget."""
        for cache in self._add_ons:
            over = self._hot.used_bytes + self._add_on_bytes() + incoming_bytes - self._budget
            if not self._budget or over <= 0:
                break
            cache.max_bytes = max(1, cache.used_bytes - over)
            cache.make_room()
            cache.max_bytes = 0
        if self._budget:
            self._hot.max_bytes = max(1, self._budget - self._add_on_bytes())
        self._hot.make_room(incoming_bytes, incoming_items)
        self._hot.max_bytes = self._budget

    def _evicted(self, key: str, hot: HotPipeline) -> None:
        logger.info("pipeline evicted: %s", key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def empty_components(folder: Path, family: Family | None) -> dict[str, torch.nn.Module]:
    """A pipeline folder's denoiser and text encoders on the meta device: shapes, no weights.

    Each component's class is the one model_index.json names (diffusers' or transformers'),
    built from its config under accelerate's ``init_empty_weights``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    index = json.loads((folder / "model_index.json").read_text())
    components: dict[str, torch.nn.Module] = {}
    with init_empty_weights():
        for name in COMPONENTS:
            library, class_name = (index.get(name) or [None, None])[:2]
            if not class_name or not (folder / name).is_dir():
                continue
            if library == "diffusers":
                model_class = getattr(diffusers, class_name)
                components[name] = model_class.from_config(model_class.load_config(str(folder / name)))
            else:
                config = AutoConfig.from_pretrained(str(folder / name))
                components[name] = getattr(transformers, class_name)(config)
    return components
