"""What one LoRA does to one parameter: the math of each format, in float32.

Every delta works on the parameter viewed as a matrix ``W`` of shape (out, in·kh·kw) (a
bias is (out, 1)) and adds ``strength · ΔW`` to a float32 accumulator. Semantics, with
``scale`` from the file (alpha / rank where the format defines one, else 1):

- LowRank (LoRA, LoCon, PEFT):       ΔW = scale · up @ down
- Tucker (LoCon with a mid tensor):  ΔW = scale · up ×₁ mid ×₂ down   (per kernel position)
- Hadamard (LyCORIS LoHa):           ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)
- Kronecker (LyCORIS LoKr):          ΔW = scale · w1 ⊗ w2  (each factor full or a product)
- Full (LyCORIS full, weight diffs): ΔW = diff
- DoRA around any of these:          ΔW = c ⊙ (W₀ + ΔW_inner) − W₀, with c = m / ‖W₀ + ΔW_inner‖
  taken per output row when the magnitude has one value per output (PEFT, LyCORIS
  ``wd_on_out``) and per input channel otherwise; c is computed once, at load, from the
  pristine weight W₀. A DoRA at strength s contributes s · ΔW, so strength 1 gives exactly
  the DoRA weight and strengths blend linearly, as for every other delta.

Dense products are rebuilt per write and never kept, so a cached LoHa or LoKr costs only
its factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from lorafleet.worker.lora.module_index import Target

_NORM_FLOOR = 1e-12


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


@dataclass
class Delta:
    """Base: a change to ``target``; subclasses give ``dense`` (and a faster ``add_to``)."""

    target: Target

    def dense(self) -> torch.Tensor:
        """ΔW as a float32 (out, in·kh·kw) matrix."""
        raise NotImplementedError

    def add_to(self, matrix: torch.Tensor, strength: float, original: torch.Tensor) -> None:
        """matrix += strength · ΔW, in place (``original`` is W₀, for deltas that need it)."""
        matrix.add_(self.dense(), alpha=strength)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def to(self, device: torch.device) -> Delta:
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors().values())


@dataclass
class LowRankDelta(Delta):
    """ΔW = scale · up @ down; up: (out, r), down: (r, in·kh·kw)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        return (self.up @ self.down).mul_(self.scale)

    def add_to(self, matrix: torch.Tensor, strength: float, original: torch.Tensor) -> None:
        matrix.addmm_(self.up, self.down, alpha=strength * self.scale)


@dataclass
class TuckerDelta(Delta):
    """LoCon with a Tucker core: up (out, r), mid (r, r, kh, kw), down (r, in)."""

    up: torch.Tensor
    mid: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        full = torch.einsum("ijhw,jc,oi->ochw", self.mid, self.down, self.up)
        return full.reshape(full.shape[0], -1).mul_(self.scale)


def rebuild_tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) from a core (r, r, kh, kw), out_factor (r, out), in_factor (r, in)."""
    return torch.einsum("ijhw,io,jc->ochw", core, out_factor, in_factor)


@dataclass
class HadamardDelta(Delta):
    """LoHa: ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b); with Tucker cores when t1/t2 are given."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        out = self.target.shape[0]
        if self.t1 is not None and self.t2 is not None:
            first = rebuild_tucker(self.t1, self.w1a, self.w1b).reshape(out, -1)
            second = rebuild_tucker(self.t2, self.w2a, self.w2b).reshape(out, -1)
        else:
            first = self.w1a @ self.w1b
            second = self.w2a @ self.w2b
        return first.mul_(second).mul_(self.scale)


@dataclass
class KroneckerDelta(Delta):
    """LoKr: ΔW = scale · w1 ⊗ w2, each factor given whole or as a product (w2 maybe Tucker)."""

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.w1 if self.w1 is not None else self.w1a @ self.w1b  # type: ignore[operator]
        if self.w2 is not None:
            second = self.w2
        elif self.t2 is not None:
            second = rebuild_tucker(self.t2, self.w2a, self.w2b)  # type: ignore[arg-type]
        else:
            rank = self.w2b.shape[0]  # type: ignore[union-attr]
            second = (self.w2a @ self.w2b.reshape(rank, -1)).reshape(self.w2a.shape[0], *self.w2b.shape[1:])  # type: ignore[union-attr,operator]
        return first, second

    def dense(self) -> torch.Tensor:
        first, second = self.factors()
        while first.dim() < second.dim():
            first = first.unsqueeze(-1)
        full = torch.kron(first, second.contiguous())
        return full.reshape(self.target.shape[0], -1).mul_(self.scale)


@dataclass
class FullDelta(Delta):
    """A whole-weight difference: ΔW = diff."""

    diff: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.diff.reshape(self.target.shape[0], -1).float()

    def add_to(self, matrix: torch.Tensor, strength: float, original: torch.Tensor) -> None:
        matrix.add_(self.diff.view_as(matrix), alpha=strength)


@dataclass
class DoraDelta(Delta):
    """DoRA around ``inner``: ΔW = c ⊙ (W₀ + ΔW_inner) − W₀ (c per row or per input channel)."""

    inner: Delta = field(default=None)  # type: ignore[assignment]
    c: torch.Tensor = field(default=None)  # type: ignore[assignment]
    per_row: bool = True

    def _broadcast(self, width: int) -> torch.Tensor:
        if self.per_row:
            return self.c[:, None]
        return self.c.repeat_interleave(width // self.c.numel())[None, :]

    def add_to(self, matrix: torch.Tensor, strength: float, original: torch.Tensor) -> None:
        c = self._broadcast(matrix.shape[1])
        matrix.add_(self.inner.dense().mul_(c), alpha=strength)
        matrix.addcmul_(original.reshape(matrix.shape).float(), c - 1, value=strength)

    def dense(self) -> torch.Tensor:
        raise NotImplementedError("a DoRA delta depends on W₀; use add_to")

    def to(self, device: torch.device) -> DoraDelta:
        return replace(self, inner=self.inner.to(device), c=self.c.to(device))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.c.nbytes


def make_dora(inner: Delta, magnitude: torch.Tensor, original: torch.Tensor) -> DoraDelta:
    """Compute c = m / ‖W₀ + ΔW_inner‖ once, from the pristine weight ``original``.

    The magnitude's shape picks the axis: one value per output row (shape (out,) or
    (out, 1, ...)), else one per input channel (shape (1, in, ...)).
    """
    out, width = _matrix_shape(inner.target.shape)
    merged = original.reshape(out, width).float() + inner.dense()
    m = magnitude.float()
    if m.numel() == out and (m.dim() <= 1 or m.shape[0] == out):
        norm = merged.norm(dim=1)
        per_row = True
    else:
        channels = m.numel()
        if width % channels:
            raise ValueError(
                f"DoRA magnitude of {channels} values fits neither {out} rows nor the input channels"
            )
        norm = (
            merged.reshape(out, channels, width // channels).transpose(0, 1).reshape(channels, -1).norm(dim=1)
        )
        per_row = False
    c = m.flatten() / norm.clamp_min(_NORM_FLOOR)
    return DoraDelta(target=inner.target, inner=inner, c=c, per_row=per_row)


@dataclass
class RowsDelta(Delta):
    """Some rows of another delta: ΔW = inner.ΔW[rows]. Kept factored (LoKr, LoHa): the
    product is formed only while it is added, so a fused layer's pieces cost their factors."""

    inner: Delta = field(default=None)  # type: ignore[assignment]
    rows: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def dense(self) -> torch.Tensor:
        return self.inner.dense()[self.rows.to(self.inner_device)]

    @property
    def inner_device(self) -> torch.device:
        tensors = list(self.inner._tensors().values())
        return tensors[0].device if tensors else torch.device("cpu")

    def to(self, device: torch.device) -> RowsDelta:
        return replace(self, inner=self.inner.to(device))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


def take_rows(delta: Delta, target: Target, rows: torch.Tensor) -> Delta:
    """The delta of ``target``, made of ``rows`` of ``delta``'s (a layer diffusers splits:
    worker/lora/original_names.py). Low-rank deltas stay low-rank (the up factor's rows;
    the down factor is shared); DoRA keeps its scale per row; full deltas keep their rows;
    the rest (LoKr, LoHa, Tucker) stay factored behind a RowsDelta."""
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(target, delta.up[rows].contiguous(), delta.down, delta.scale)
    if isinstance(delta, DoraDelta):
        c = delta.c[rows] if delta.per_row else delta.c
        return DoraDelta(
            target=target, inner=take_rows(delta.inner, target, rows), c=c, per_row=delta.per_row
        )
    if isinstance(delta, FullDelta):
        return FullDelta(target, delta.dense()[rows].contiguous())
    return RowsDelta(target, inner=delta, rows=rows.cpu())
