"""LoRA files of every common format -> per-parameter deltas for one pipeline.

A LoRA file is a flat dict of tensors whose names say which layer they adapt. This module
maps each name to a parameter of the pipeline (the ``ModuleIndex``), groups the tensors
of one layer, and builds the delta that layer's weight receives.

Semantics (W is the layer's weight viewed as a matrix: out x in·kh·kw):

- LoRA / LoCon (kohya ``lora_down``/``lora_up``/``alpha``; PEFT ``lora_A``/``lora_B``;
  diffusers' older ``lora.down``/``lora.up``): ΔW = (alpha / rank) · up @ down, with
  scale 1 when the file gives no alpha.

Every tensor is checked before anything is returned: shapes must fit the target layer and
values must be finite, so a bad file is refused before a weight is touched.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""Pipeline components a LoRA may adapt."""
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Name prefixes per component: kohya flattens module paths with "_", diffusers and PEFT
# keep the dots.
_FLAT_PREFIXES = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
_DOTTED_PREFIXES = {
    "unet": ("unet.", "base_model.model."),
    "text_encoder": ("text_encoder.", "te1.", "base_model.model."),
    "text_encoder_2": ("text_encoder_2.", "te2."),
}

# Suffix -> (role). Longest first so ".lora_down.weight" wins over ".weight".
_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".alpha": "alpha",
}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")


@dataclass(frozen=True)
class Target:
    """One parameter a LoRA can change."""

    component: str
    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.component}:{self.module}.{self.param}"

    @property
    def is_text_encoder(self) -> bool:
        return self.component in TEXT_ENCODERS


def file_module_names(component: str, module: str) -> list[str]:
    """The module paths LoRA files use for ``module``; the first is the usual one.

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel (not from
    CLIPTextModelWithProjection), while files made before keep it: both are accepted.
    """
    if component not in TEXT_ENCODERS or module == "text_projection":
        return [module]
    if module.startswith("text_model."):
        return [module, module[len("text_model.") :]]
    return [f"text_model.{module}", module]


class ModuleIndex:
    """Every adaptable parameter of a pipeline, reachable by each name formats use for it."""

    def __init__(self, components: dict[str, torch.nn.Module]) -> None:
        self.targets: dict[str, Target] = {}
        self._by_name: dict[str, str] = {}
        for component, model in components.items():
            for name, module in model.named_modules():
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
                    continue
                if isinstance(module, torch.nn.Embedding):
                    continue
                target = Target(component, name, "weight", tuple(weight.shape))
                self.targets[target.key] = target
                for alias in file_module_names(component, name):
                    for prefix in _FLAT_PREFIXES[component]:
                        self._by_name.setdefault(prefix + alias.replace(".", "_"), target.key)
                    for prefix in _DOTTED_PREFIXES[component]:
                        self._by_name.setdefault(prefix + alias, target.key)

    def lookup(self, module_name: str) -> Target | None:
        key = self._by_name.get(module_name)
        return self.targets[key] if key else None

    def parameter(self, components: dict[str, torch.nn.Module], target: Target) -> torch.nn.Parameter:
        module = components[target.component].get_submodule(target.module)
        return getattr(module, target.param)


class LoraFormatError(ValueError):
    """The file cannot be applied to this model; the message says why."""


@dataclass
class LowRankDelta:
    """ΔW = scale · up @ down, with up: out x r and down: r x in·kh·kw (float32)."""

    target: Target
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    def add_to(self, weight: torch.Tensor, strength: float) -> None:
        """weight (out x in·kh·kw, float32) += strength · ΔW, in place."""
        weight.addmm_(self.up, self.down, alpha=strength * self.scale)

    def to(self, device: torch.device) -> LowRankDelta:
        return LowRankDelta(self.target, self.up.to(device), self.down.to(device), self.scale)

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes


Delta = LowRankDelta


@dataclass
class ParsedLora:
    """A LoRA file, mapped onto one pipeline."""

    format: str
    deltas: list[Delta]
    unmatched: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas)


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            module = _PROCESSOR.sub(lambda m: "." + m.group(1).replace("to_out", "to_out.0"), module)
            return module, role
    return None


def _finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise LoraFormatError(f"tensor {name!r} holds NaN or infinite values")


def _low_rank(target: Target, module: str, parts: dict[str, torch.Tensor]) -> LowRankDelta:
    if "up" not in parts or "down" not in parts:
        missing = "up" if "up" not in parts else "down"
        raise LoraFormatError(f"{module}: has no {missing} factor")
    up, down = parts["up"].float(), parts["down"].float()
    rank = down.shape[0]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(rank, -1)
    out_features = target.shape[0]
    in_flat = 1
    for size in target.shape[1:]:
        in_flat *= size
    if up2.shape != (out_features, rank) or down2.shape[1] != in_flat:
        raise LoraFormatError(
            f"{module}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit the layer's "
            f"weight {target.shape}"
        )
    alpha = parts.get("alpha")
    scale = float(alpha) / rank if alpha is not None else 1.0
    if not torch.isfinite(torch.tensor(scale)):
        raise LoraFormatError(f"{module}: alpha is not finite")
    return LowRankDelta(target, up2.contiguous(), down2.contiguous(), scale)


def parse_lora(state: dict[str, torch.Tensor], index: ModuleIndex, format_name: str) -> ParsedLora:
    """Map a LoRA file's tensors onto ``index``'s parameters.

    Raises LoraFormatError when a tensor is not finite, a layer's factors do not fit its
    weight, or no key matches any layer of the model. Keys that match no layer are
    returned in ``unmatched`` (the caller reports them).
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unmatched: list[str] = []
    for name, tensor in state.items():
        split = _split(name)
        if split is None:
            unmatched.append(name)
            continue
        _finite(name, tensor)
        module, role = split
        groups[module][role] = tensor
    deltas = []
    for module, parts in groups.items():
        target = index.lookup(module)
        if target is None:
            unmatched.extend(f"{module}.{role}" for role in parts)
            continue
        deltas.append(_low_rank(target, module, parts))
    if not deltas:
        sample = ", ".join(sorted(state)[:3])
        raise LoraFormatError(
            f"no key of this {format_name} file matches a layer of the model (first keys: {sample})"
        )
    return ParsedLora(format=format_name, deltas=deltas, unmatched=sorted(unmatched))
