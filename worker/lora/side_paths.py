"""Side paths: each row of one batched denoiser call runs its own LoRA stack, weights untouched.

Semantics: for every Linear or Conv2d layer that some row's stack touches, and every row b
of the call,

    y_b  =  base(x_b)  +  U_b (D_b ⊛ x_b)

where base is the layer as it is (its weight W₀ and bias, never written), D_b (r, in·kh·kw)
and U_b (out, r) are row b's stack on that layer joined along the rank — every low-rank
delta's down factor stacked, its up factor scaled by strength · scale, as
``patcher.concatenate_low_rank`` joins them for a merge — and ``⊛`` is a matrix product
for a Linear and, for a Conv2d, a kh×kw convolution with the base's stride, padding and
dilation (the up factor is then a 1×1 convolution). U_b D_b is exactly the ΔW the patcher
would add to W₀, so a row's output equals the merged model's up to float rounding: the
merge rounds W₀ + ΔW once, the side path rounds base(x) and the side term separately.

Every row's factors are zero-padded to one fixed rank, the plan's ``rank_budget`` (r), and
stacked: down (rows, r, in·kh·kw), up (rows, out, r), on the layer's device in its dtype.
A layer is two batched kernels whatever the number of stacks: ``torch.bmm`` for a Linear
(its input viewed as (rows, tokens, in)), a grouped convolution with groups = rows for a
Conv2d. Layers no row touches get no hook. The plan is built once per call (all steps of
a sampling run share it) and attached with forward hooks that ``attached()`` removes on
exit, exceptions included. A row with an empty stack has zero factors: the base model.

Determinism: a call's shapes depend only on (rows, rank_budget) and the model, never on
which stacks the rows carry. Each row's side term is its own GEMM (or convolution group)
of those fixed shapes, reading only its input and its factors, so the kernels do the same
arithmetic in the same order for that row whatever the other rows hold. The padding adds
exact zeros in fixed positions: a row with rank 4 gives the same bits whether the others
have rank 0 or 120. So with the same rows and budget, a row's output is a function of its
own input and stack alone, bit for bit, as far as the base layers' own rows are (at some
row counts a CPU's few-row products round by position: worker/run/batching.py). Across
different row counts or budgets only float rounding may differ.

Only a low-rank delta (LoRA, LoCon, PEFT; also a fused layer's rows of one) has a cheap
side path. LoHa, LoKr, Tucker, full differences and DoRA need a dense ΔW per forward:
they are refused with ``NoSidePath`` and such LoRAs run merged (``side_path_ok`` tells
beforehand). Text-encoder deltas are skipped: the caller encodes each job's prompts with
its own merged text-encoder weights. Inference only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorafleet.common.schema.jobs import SIDE_PATH_RANK_BUDGET
from lorafleet.worker.lora.deltas import (
    Delta,
    DoraDelta,
    FullDelta,
    HadamardDelta,
    KroneckerDelta,
    LowRankDelta,
    RowsDelta,
    TuckerDelta,
)
from lorafleet.worker.lora.formats import ParsedLora
from lorafleet.worker.lora.module_index import TEXT_ENCODERS
from lorafleet.worker.lora.patcher import StackEntry, concatenate_low_rank

RANK_BUDGET = SIDE_PATH_RANK_BUDGET

Source = ParsedLora | Sequence[Delta]
Stack = Sequence[tuple[Source, float]]
"""One row's LoRAs: (a parsed LoRA or its deltas, its denoiser strength), in stack order."""

_KINDS = {
    HadamardDelta: "LoHa (HadamardDelta)",
    KroneckerDelta: "LoKr (KroneckerDelta)",
    TuckerDelta: "Tucker LoCon (TuckerDelta)",
    FullDelta: "full weight difference (FullDelta)",
    DoraDelta: "DoRA (DoraDelta)",
}


class NoSidePath(ValueError):
    """A stack that cannot run on side paths: a delta kind with no cheap side path, a
    joined rank over the budget, or a layer that is neither a Linear nor a plain Conv2d.

    Not an InvalidInput: the job is fine and runs merged; meeting this in a running call
    means the caller mixed a job it should have kept apart (``side_path_ok``).
    """


def _kind(delta: Delta) -> str:
    if isinstance(delta, RowsDelta):
        return f"rows (RowsDelta) of a {_kind(delta.inner)}"
    return _KINDS.get(type(delta), type(delta).__name__)


def _low_rank(delta: Delta) -> LowRankDelta | None:
    """The delta as a LowRankDelta, or None when it has no cheap side path."""
    if type(delta) is LowRankDelta:
        return delta
    if isinstance(delta, RowsDelta) and type(delta.inner) is LowRankDelta:
        inner = delta.inner
        rows = delta.rows.to(inner.up.device)
        return LowRankDelta(delta.target, inner.up[rows], inner.down, inner.scale)
    return None


def _refusal(format_name: str, delta: Delta) -> str:
    return (
        f"{format_name} LoRA: its {_kind(delta)} delta on {delta.target.key} has no side path "
        "(only low-rank LoRA and LoCon deltas do); such LoRAs run merged"
    )


def side_path_ok(parsed: ParsedLora) -> str | None:
    """None when every denoiser delta of ``parsed`` has a side path, else why not.

    Checks the delta kinds only (text-encoder deltas are the caller's, and always fine);
    the rank budget depends on the whole stack (``stack_rank``).
    """
    for delta in parsed.deltas:
        if not delta.target.is_text_encoder and _low_rank(delta) is None:
            return _refusal(parsed.format, delta)
    return None


def side_stack(entries: Sequence[StackEntry]) -> list[tuple[ParsedLora, float]]:
    """A job's stack as a row's: each LoRA with its UNet (denoiser) strength."""
    return [(entry.lora, entry.unet_strength) for entry in entries]


def for_cfg(stacks: Sequence[Stack]) -> list[Stack]:
    """Per-image stacks in the rows of a classifier-free-guided call.

    diffusers runs [uncond rows; cond rows], each half in the images' order, so image i is
    rows i and n + i: ``stacks + stacks``.
    """
    return [*stacks, *stacks]


def _parts(
    stack: Stack, components: dict[str, torch.nn.Module]
) -> dict[str, list[tuple[LowRankDelta, float]]]:
    """Per layer (``component:module``), the (low-rank delta, strength) pairs of the stack."""
    parts: dict[str, list[tuple[LowRankDelta, float]]] = {}
    for source, strength in stack:
        if strength == 0.0:  # adds nothing, as in the patcher
            continue
        format_name = source.format if isinstance(source, ParsedLora) else "given"
        deltas = source.deltas if isinstance(source, ParsedLora) else source
        for delta in deltas:
            target = delta.target
            if target.component not in components:
                if target.is_text_encoder:
                    continue
                raise ValueError(
                    f"{target.key}: the stack adapts {target.component!r}, not one of the "
                    f"components given ({', '.join(components)})"
                )
            low = _low_rank(delta)
            if low is None or target.param != "weight":
                raise NoSidePath(_refusal(format_name, delta))
            flattened = FLATTENED_INPUTS.get(type(components[target.component]).__name__)
            if flattened is not None and flattened.match(target.module):
                raise NoSidePath(
                    f"{format_name} LoRA: {target.key} sees every image's tokens in one sequence, so "
                    "its rows cannot take different stacks; such LoRAs run merged"
                )
            parts.setdefault(f"{target.component}:{target.module}", []).append((low, float(strength)))
    return parts


def check_stack(stack: Stack, components: dict[str, torch.nn.Module], rank_budget: int = RANK_BUDGET) -> None:
    """NoSidePath, saying why, unless ``stack`` can take a row of a call on ``components``:
    what ``SidePaths.build`` would refuse it for, found before any call is planned."""
    for key, parts in _parts(stack, components).items():
        component, module_name = key.split(":", 1)
        _empty_layer(key, components[component].get_submodule(module_name), 0, 0)
        rank = sum(delta.down.shape[0] for delta, _ in parts)
        if rank > rank_budget:
            raise NoSidePath(
                f"the stack joins rank {rank} on {key}, over the side paths' budget of {rank_budget}; "
                "such a stack runs merged"
            )


def stack_rank(stack: Stack, components: dict[str, torch.nn.Module]) -> int:
    """The largest rank ``stack`` joins on any layer of ``components`` (0 for none)."""
    parts = _parts(stack, components)
    return max((sum(d.down.shape[0] for d, _ in p) for p in parts.values()), default=0)


@dataclass
class LayerSidePath:
    """One hooked layer: every row's factors, zero-padded to the budget and stacked.

    down: (rows, r, in·kh·kw); up: (rows, out, r); side term of row b = U_b (D_b ⊛ x_b).
    """

    key: str
    module: torch.nn.Module
    down: torch.Tensor
    up: torch.Tensor
    _doubled: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.down.shape[0]

    def factors(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) for an input of ``batch`` rows: the plan's, or twice them for a call
        that doubles its rows for classifier-free guidance ([uncond; cond], diffusers' layout)."""
        if batch == self.rows:
            return self.down, self.up
        if batch == 2 * self.rows:
            if self._doubled is None:
                self._doubled = (torch.cat([self.down, self.down]), torch.cat([self.up, self.up]))
            return self._doubled
        raise ValueError(
            f"{self.key} sees a batch of {batch} rows: the plan has {self.rows} (one stack per row; "
            "twice that under classifier-free guidance)"
        )

    def side(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's side term for the layer's input ``x`` (batch first), in one pass."""
        down, up = self.factors(x.shape[0] if x.dim() > 1 else 0)
        module, rows, rank = self.module, down.shape[0], down.shape[1]
        if isinstance(module, torch.nn.Conv2d):
            kernel = down.view(rows * rank, module.in_channels, *module.kernel_size)
            flat = x.reshape(1, rows * module.in_channels, *x.shape[2:])
            hidden = F.conv2d(flat, kernel, None, module.stride, module.padding, module.dilation, rows)
            side = F.conv2d(hidden, up.view(rows * module.out_channels, rank, 1, 1), None, 1, 0, 1, rows)
            return side.view(rows, module.out_channels, *side.shape[2:])
        hidden = torch.bmm(x.reshape(rows, -1, x.shape[-1]), down.mT)
        side = torch.bmm(hidden, up.mT)
        return side.view(*x.shape[:-1], side.shape[-1])

    def hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the base output plus every row's side term."""
        x = args[0] if args else kwargs["input"]
        if isinstance(module, torch.nn.Linear) and not output.requires_grad and output.is_contiguous():
            down, up = self.factors(x.shape[0] if x.dim() > 1 else 0)
            hidden = torch.bmm(x.reshape(down.shape[0], -1, x.shape[-1]), down.mT)
            output.view(down.shape[0], -1, output.shape[-1]).baddbmm_(hidden, up.mT)  # one kernel
            return output
        side = self.side(x)
        return output + side if output.requires_grad else output.add_(side)


class SidePaths:
    """The side paths of one batched call: per hooked layer, every row's stacked factors.

    ``SidePaths.build(components, stacks)`` once per call, then ``with paths.attached():``
    around the call (every denoiser step). The weights are never written.
    """

    def __init__(self, rows: int, rank_budget: int, layers: dict[str, LayerSidePath]) -> None:
        self.rows = rows
        self.rank_budget = rank_budget
        self.layers = layers
        self._attached = False

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        components: dict[str, torch.nn.Module],
        stacks: Sequence[Stack],
        *,
        rank_budget: int = RANK_BUDGET,
    ) -> SidePaths:
        """Plan a call whose row b carries ``stacks[b]`` on the denoiser ``components``
        (``{"unet": unet}`` or ``{"transformer": ...}``).

        Rows may share a stack object (its factors are joined once). Raises NoSidePath for
        a delta kind with no side path, a row joining more than ``rank_budget`` on a layer,
        or a layer that is not a Linear or a zero-padded, ungrouped Conv2d.
        """
        text = [name for name in components if name in TEXT_ENCODERS]
        if text:
            raise ValueError(
                f"side paths serve the denoiser only, not {', '.join(text)}: encode each job's "
                "prompts with its merged text-encoder weights"
            )
        if not stacks:
            raise ValueError("a call needs at least one row")
        if rank_budget < 1:
            raise ValueError(f"rank_budget must be at least 1, got {rank_budget}")
        distinct: dict[tuple, list[int]] = {}  # stack identity -> its rows
        first: dict[tuple, Stack] = {}
        for row, stack in enumerate(stacks):
            identity = _identity(row, stack)
            distinct.setdefault(identity, []).append(row)
            first.setdefault(identity, stack)
        joined = []  # (rows, per-layer parts) per distinct stack
        for identity, rows in distinct.items():
            parts = _parts(first[identity], components)
            for key, layer_parts in parts.items():
                rank = sum(delta.down.shape[0] for delta, _ in layer_parts)
                if rank > rank_budget:
                    raise NoSidePath(
                        f"row {rows[0]}'s stack joins rank {rank} on {key}, over the rank budget of "
                        f"{rank_budget}: such a stack runs merged (or every call takes a larger budget)"
                    )
            joined.append((rows, parts))
        keys = sorted({key for _, parts in joined for key in parts})
        layers = {}
        for key in keys:
            component, module_name = key.split(":", 1)
            module = components[component].get_submodule(module_name)
            layer = _empty_layer(key, module, len(stacks), rank_budget)
            for rows, parts in joined:
                if key in parts:
                    _fill(layer, rows, parts[key])
            layers[key] = layer
        return cls(len(stacks), rank_budget, layers)

    @property
    def nbytes(self) -> int:
        """Bytes of every stacked factor (padding included)."""
        return sum(layer.down.nbytes + layer.up.nbytes for layer in self.layers.values())

    @contextmanager
    def attached(self) -> Iterator[SidePaths]:
        """Hook every planned layer for the block; the hooks are removed on exit, always."""
        if self._attached:
            raise ValueError("these side paths are already attached (their hooks would add twice)")
        handles = []
        self._attached = True
        try:
            for layer in self.layers.values():
                handles.append(layer.module.register_forward_hook(layer.hook, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._attached = False


def _identity(row: int, stack: Stack) -> tuple:
    """What makes two rows' stacks the same: each LoRA object and its strength, in order."""
    try:
        return tuple((id(source), float(strength)) for source, strength in stack)
    except (TypeError, ValueError):
        raise ValueError(
            f"row {row}'s stack must be a list of (ParsedLora or deltas, strength) pairs, got {stack!r:.80}"
            " (stacks holds one stack per row)"
        ) from None


FLATTENED_INPUTS = {
    "ZImageTransformer2DModel": re.compile(r"(all_x_embedder|cap_embedder)\b"),
}
"""Per model class, the layers that see every image's tokens concatenated into one sequence
(no batch dimension): no row can be told from another there, so no side path."""


def _empty_layer(key: str, module: torch.nn.Module, rows: int, rank: int) -> LayerSidePath:
    """A layer's zero factors, on its weight's device and in its dtype."""
    weight = module.weight
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise NoSidePath(
                f"{key} is a Conv2d with groups={module.groups}, padding_mode={module.padding_mode!r}: "
                "side paths serve ungrouped, zero-padded convolutions; this stack runs merged"
            )
        width = weight[0].numel()
    elif isinstance(module, torch.nn.Linear):
        width = module.in_features
    else:
        raise NoSidePath(
            f"{key} is a {type(module).__name__}, not a Linear or Conv2d; this stack runs merged"
        )
    # an fp8 weight is upcast as its layer runs (worker/flow_checkpoints.py), a GGUF one
    # dequantized (worker/gguf_checkpoints.py): the side path computes in the layer's compute
    # dtype (GGUFLinear's own; for fp8 the bias's, bf16 where there is none)
    dtype = getattr(module, "compute_dtype", None) or weight.dtype
    if dtype.itemsize == 1:
        dtype = module.bias.dtype if module.bias is not None else torch.bfloat16
    like = {"dtype": dtype, "device": weight.device}
    return LayerSidePath(
        key,
        module,
        torch.zeros(rows, rank, width, **like),
        torch.zeros(rows, weight.shape[0], rank, **like),
    )


def _fill(layer: LayerSidePath, rows: list[int], parts: list[tuple[LowRankDelta, float]]) -> None:
    """Write one stack's joined factors into its rows (the rest of the rank stays zero)."""
    up, down, alpha = concatenate_low_rank(parts)
    if up.shape[0] != layer.up.shape[1] or down.shape[1] != layer.down.shape[2]:
        raise ValueError(
            f"{layer.key}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit the layer "
            f"({layer.up.shape[1]} outputs, {layer.down.shape[2]} inputs)"
        )
    device = layer.down.device
    up = up.to(device=device, dtype=torch.float32) * alpha  # scaled in float32, then rounded once
    index = torch.tensor(rows, device=device)
    rank = down.shape[0]
    layer.down[index, :rank] = down.to(device=device, dtype=layer.down.dtype)
    layer.up[index, :, :rank] = up.to(layer.up.dtype)
