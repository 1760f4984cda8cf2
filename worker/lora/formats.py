"""LoRA files of every common format -> per-parameter deltas for one pipeline.

A LoRA file is a flat dict of tensors whose names say which layer they adapt and what
role each tensor plays. Parsing splits every name into (layer, role), finds the layer in
the pipeline's ModuleIndex (any naming convention: kohya, diffusers/PEFT, LDM/SGM blocks),
and builds the delta its roles describe (lora_deltas has the math):

    lora_down/lora_up[/lora_mid][/alpha]    kohya LoRA and LoCon (Tucker with a mid)
    lora_A/lora_B[.default]                 PEFT / diffusers (alpha from the file's metadata)
    processor.{qkv,proj}_lora{1,2}.down/up  XLabs' FLUX.1 LoRAs (1: image stream, 2: text)
    lora.down/lora.up, *_lora.down/up       diffusers' older attention-processor names
    hada_w1_a/b, hada_w2_a/b[, hada_t1/t2]  LyCORIS LoHa
    lokr_w1[_a/_b], lokr_w2[_a/_b][, t2]    LyCORIS LoKr
    diff, diff_b                            full weight (and bias) differences
    dora_scale, lora_magnitude_vector       DoRA around any of the above

Every tensor is checked before anything is returned: shapes must fit the target layer and
values must be finite, so a bad file is refused before a weight is touched. Keys that
match no layer are returned in ``unmatched`` for the caller to report. A layer that the
family's original code fuses and diffusers splits (FLUX's ``img_attn.qkv``) gets its delta
built whole, then its rows dealt out to diffusers' modules (``deltas.take_rows``).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafleet.common.schema.errors import LoraError
from lorafleet.worker.lora.deltas import (
    Delta,
    FullDelta,
    HadamardDelta,
    KroneckerDelta,
    LowRankDelta,
    RowsDelta,
    TuckerDelta,
    make_dora,
    take_rows,
)
from lorafleet.worker.lora.module_index import DENOISERS, TEXT_ENCODERS, Fused, ModuleIndex, Target

_ROLES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".diff": "diff",
    ".diff_b": "diff_b",
    **{f".hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
_SUFFIXES = sorted(_ROLES, key=len, reverse=True)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
_XLABS = re.compile(r"^(?:.*\.)?(double_blocks\.\d+)\.processor\.(qkv|proj)_lora([12])\.(down|up)\.weight$")

_INPUT_LAYERS = {"x_embedder", "img_in"}
"""The transformers' input layers, which BFL's Control LoRAs widen (64 -> 128 channels)."""

Original = Callable[[Target], torch.Tensor]
"""Gives the pristine weight of a target (DoRA needs it)."""


class LoraFormatError(LoraError):
    """The file cannot be applied to this model; the message says why."""


@dataclass
class ParsedLora:
    """A LoRA file, mapped onto one pipeline."""

    format: str
    deltas: list[Delta]
    unmatched: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """The factors held, each once (a fused layer's pieces share theirs)."""
        shared = {id(d.inner): d.inner.nbytes for d in self.deltas if isinstance(d, RowsDelta)}
        return sum(d.nbytes for d in self.deltas if not isinstance(d, RowsDelta)) + sum(shared.values())


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name as the file writes it, role) or None for a name of no known role."""
    if match := _XLABS.match(key):
        block, layer, stream, role = match.groups()
        return f"{block}.{'img' if stream == '1' else 'txt'}_attn.{layer}", role
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            module = _PROCESSOR.sub(lambda m: "." + m.group(1).replace("to_out", "to_out.0"), module)
            return module, _ROLES[suffix]
    return None


@dataclass
class MatchReport:
    """Which of a file's layers a model has, by name alone (no tensor is read)."""

    matched: dict[str, int]
    unmatched: list[str]


def match_keys(keys: list[str], index: ModuleIndex) -> MatchReport:
    """Count the file's layers each component of the model matches; list the keys it does not."""
    matched: dict[str, set[str]] = defaultdict(set)
    unmatched = []
    for key in keys:
        split = split_key(key)
        target = index.lookup(split[0]) if split else None
        fused = index.lookup_fused(split[0]) if split and target is None else None
        if fused is not None:
            matched[fused.target.component].add(fused.target.module)
        elif target is None:
            unmatched.append(key)
        else:
            matched[target.component].add(target.module)
    return MatchReport({c: len(m) for c, m in sorted(matched.items())}, sorted(unmatched))


def _peft_alphas(metadata: dict[str, str]) -> dict[str, tuple[float | None, dict[str, float]]]:
    """component -> (lora_alpha, alpha_pattern) from diffusers' ``lora_adapter_metadata``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    alphas = {}
    for component in (*DENOISERS, *TEXT_ENCODERS):
        alpha = config.get(f"{component}.lora_alpha")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        if alpha is not None or pattern:
            alphas[component] = (float(alpha) if alpha is not None else None, dict(pattern))
    return alphas


class _LayerParser:
    """Builds the delta of one layer from its tensors (already on the target device)."""

    def __init__(
        self, target: Target, name: str, parts: dict[str, torch.Tensor], peft_alpha: float | None
    ) -> None:
        self.target, self.name, self.parts = target, name, parts
        self.peft_alpha = peft_alpha

    def fail(self, problem: str) -> LoraFormatError:
        return LoraFormatError(f"{self.name}: {problem}")

    def get(self, role: str) -> torch.Tensor | None:
        tensor = self.parts.get(role)
        return None if tensor is None else tensor.float()

    def alpha_scale(self, rank: int, default: float | None = None) -> float:
        alpha = self.parts.get("alpha")
        if alpha is not None:
            if alpha.numel() != 1:
                raise self.fail(f"alpha has {alpha.numel()} values, not one")
            return float(alpha.float().item()) / rank
        if default is not None:
            return default / rank
        return 1.0

    def fits(self, delta: Delta) -> Delta:
        """Refuse a delta whose full shape differs from the target's."""
        expected = (self.target.shape[0], math.prod(self.target.shape) // self.target.shape[0])
        if isinstance(delta, LowRankDelta):
            got = (delta.up.shape[0], delta.down.shape[1])
            if delta.up.shape[1] != delta.down.shape[0]:
                raise self.fail(
                    f"factors {tuple(delta.up.shape)} @ {tuple(delta.down.shape)} do not multiply"
                )
        else:
            try:
                got = tuple(delta.dense().shape)
            except RuntimeError as exc:
                raise self.fail(f"factors do not combine: {exc}") from None
        if got != expected:
            problem = f"factors give a {got} delta; the layer's weight is {self.target.shape}"
            if self.target.module in _INPUT_LAYERS and got[0] == expected[0] and got[1] > expected[1]:
                problem += (
                    ": the LoRA changes the layer's shape (a Control LoRA widens the input layer for a "
                    "control image); lorafleet serves no shape-changing LoRA"
                )
            raise self.fail(problem)
        return delta

    def build(self) -> Delta:
        roles = set(self.parts) - {"alpha", "magnitude"}
        target = self.target
        if roles >= {"down", "up"}:
            down, up, mid = self.get("down"), self.get("up"), self.get("mid")
            rank = down.shape[0]  # type: ignore[union-attr]
            scale = self.alpha_scale(rank, self.peft_alpha)
            if mid is not None:
                delta: Delta = TuckerDelta(
                    target, up.reshape(up.shape[0], -1), mid, down.reshape(rank, -1), scale
                )  # type: ignore[union-attr]
            else:
                delta = LowRankDelta(
                    target,
                    up.reshape(up.shape[0], -1).contiguous(),
                    down.reshape(rank, -1).contiguous(),
                    scale,
                )  # type: ignore[union-attr]
        elif roles >= {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
            w1a, w1b = self.get("hada_w1_a"), self.get("hada_w1_b")
            t1, t2 = self.get("hada_t1"), self.get("hada_t2")
            rank = w1b.shape[0]  # type: ignore[union-attr]
            delta = HadamardDelta(
                target,
                w1a,
                w1b.reshape(rank, -1) if t1 is None else w1b,  # type: ignore[union-attr]
                self.get("hada_w2_a"),
                self._flat("hada_w2_b") if t2 is None else self.get("hada_w2_b"),
                t1,
                t2,
                self.alpha_scale(rank),
            )
        elif roles & {"lokr_w1", "lokr_w1_a"} and roles & {"lokr_w2", "lokr_w2_a"}:
            w1b, w2b = self.get("lokr_w1_b"), self.get("lokr_w2_b")
            if w2b is not None:
                rank = w2b.shape[0]
            elif w1b is not None:
                rank = w1b.shape[0]
            else:
                rank = 0
            scale = self.alpha_scale(rank) if rank else 1.0
            delta = KroneckerDelta(
                target,
                self.get("lokr_w1"),
                self.get("lokr_w1_a"),
                w1b,
                self.get("lokr_w2"),
                self.get("lokr_w2_a"),
                w2b,
                self.get("lokr_t2"),
                scale,
            )
        elif roles == {"diff"}:
            diff = self.parts["diff"]
            if math.prod(tuple(diff.shape)) != math.prod(target.shape):
                raise self.fail(f"diff {tuple(diff.shape)} does not fit the layer's weight {target.shape}")
            delta = FullDelta(target, diff.float().reshape(target.shape[0], -1))
        else:
            raise self.fail(f"tensors {sorted(roles)} make no known LoRA layer")
        return self.fits(delta)

    def _flat(self, role: str) -> torch.Tensor:
        tensor = self.get(role)
        return tensor.reshape(tensor.shape[0], -1)  # type: ignore[union-attr]


def parse_lora(
    state: dict[str, torch.Tensor],
    index: ModuleIndex,
    format_name: str,
    *,
    metadata: dict[str, str] | None = None,
    original: Original | None = None,
    device: torch.device | None = None,
) -> ParsedLora:
    """Map a LoRA file's tensors onto ``index``'s parameters (see the module docstring).

    ``original`` gives a target's pristine weight (needed for DoRA files); ``device`` is
    where the factors are moved before any math. Raises LoraFormatError when a tensor is
    not finite, a layer's tensors do not fit its weight, or no key matches the model.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unmatched: list[str] = []
    for key, tensor in state.items():
        split = split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraFormatError(f"tensor {key!r} holds NaN or infinite values")
        module, role = split
        groups[module][role] = tensor.to(device) if device is not None else tensor
    alphas = _peft_alphas(metadata or {})
    deltas: list[Delta] = []
    for module, parts in groups.items():
        fused = index.lookup_fused(module) if index.lookup(module) is None else None
        if fused is not None:
            deltas.extend(_fused_deltas(fused, index, module, parts, alphas, original))
            continue
        bias = parts.pop("diff_b", None)
        target = index.lookup(module)
        if target is None:
            unmatched.extend(
                f"{module}.{role}" for role in [*parts, *(["diff_b"] if bias is not None else [])]
            )
            continue
        if bias is not None:
            bias_target = index.lookup(module, "bias")
            if bias_target is None or bias.numel() != math.prod(bias_target.shape):
                raise LoraFormatError(f"{module}: diff_b does not fit the layer's bias")
            deltas.append(FullDelta(bias_target, bias.float().reshape(-1, 1)))
        if not set(parts) - {"alpha"}:
            continue
        peft_alpha = _peft_alpha(alphas, target)
        delta = _LayerParser(target, module, parts, peft_alpha).build()
        magnitude = parts.get("magnitude")
        if magnitude is not None:
            if original is None:
                raise LoraFormatError(f"{module}: a DoRA layer needs the model's weights to load")
            try:
                delta = make_dora(delta, magnitude, original(target).to(magnitude.device))
            except ValueError as exc:
                raise LoraFormatError(f"{module}: {exc}") from None
        deltas.append(delta)
    if not deltas:
        sample = ", ".join(sorted(state)[:3])
        raise LoraFormatError(
            f"no key of this {format_name} file matches a layer of the model (first keys: {sample})"
        )
    return ParsedLora(format=format_name, deltas=deltas, unmatched=sorted(unmatched))


def _fused_deltas(
    fused: Fused,
    index: ModuleIndex,
    module: str,
    parts: dict[str, torch.Tensor],
    alphas: dict,
    original: Original | None,
) -> list[Delta]:
    """A fused layer's delta, built whole against the original's shape, dealt out by rows."""
    deltas: list[Delta] = []
    bias = parts.pop("diff_b", None)
    if bias is not None:
        fused_bias = index.lookup_fused(module, "bias")
        if fused_bias is None or bias.numel() != fused_bias.target.shape[0]:
            raise LoraFormatError(f"{module}: diff_b does not fit the layer's bias")
        whole = bias.float().reshape(-1, 1)
        deltas += [FullDelta(target, whole[rows].contiguous()) for target, rows in fused_bias.pieces]
    if not set(parts) - {"alpha"}:
        return deltas
    delta = _LayerParser(fused.target, module, parts, _peft_alpha(alphas, fused.target)).build()
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        if original is None:
            raise LoraFormatError(f"{module}: a DoRA layer needs the model's weights to load")
        weight = torch.empty(fused.target.shape, device=magnitude.device)
        for target, rows in fused.pieces:
            weight[rows.to(weight.device)] = original(target).to(weight.device).float().reshape(len(rows), -1)
        try:
            delta = make_dora(delta, magnitude, weight)
        except ValueError as exc:
            raise LoraFormatError(f"{module}: {exc}") from None
    for target, rows in fused.pieces:
        deltas.append(take_rows(delta, target, rows.to(_device(delta))))
    return deltas


def _device(delta: Delta) -> torch.device:
    inner = getattr(delta, "inner", None) or delta
    tensors = [t for t in vars(inner).values() if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def _peft_alpha(alphas: dict[str, tuple[float | None, dict[str, float]]], target: Target) -> float | None:
    if target.component not in alphas:
        return None
    default, patterns = alphas[target.component]
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", target.module):
            return float(alpha)
    return default
