"""Apply a LoRA stack to a pipeline's weights in place; restore them bit-exactly.

Semantics: for every parameter W that the stack touches,

    W  <-  round_to_dtype( float32(W₀) + Σᵢ strengthᵢ · ΔWᵢ )

where W₀ is the pristine weight, kept as a copy on the parameter's device the first time
the parameter is touched. The sum is accumulated in float32: the stack's low-rank deltas
for that parameter first, as one GEMM whose rank is the sum of theirs (each up factor
scaled by strength · scale), then any other deltas in stack order. A float32 parameter
accumulates in place (``addmm(W₀, up, down, out=W)``); a half-precision one accumulates
in a float32 workspace and is rounded once. Either way the result goes into the
parameter's existing storage, so no new Parameter objects appear and compiled graphs keep
working. Restore is ``W.copy_(W₀)``: bit-exact,
never a subtraction.

``apply(stack)`` moves from the current stack to the new one: parameters only the old
stack touched are restored, parameters whose contributions changed are rewritten from W₀,
and parameters whose contributions are identical are left alone, so applying the same stack
twice costs nothing. If anything fails half-way, every touched parameter is restored before
the exception leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lora.deltas import Delta, LowRankDelta
from lorafleet.worker.lora.formats import ParsedLora
from lorafleet.worker.lora.module_index import ModuleIndex, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a stack with its strengths for the UNet and for the text encoders."""

    lora: ParsedLora
    unet_strength: float
    text_encoder_strength: float


@dataclass
class PatchTimings:
    apply: float = 0.0
    restore: float = 0.0
    written: int = 0
    restored: int = 0


Contribution = tuple[tuple[int, float], ...]


def concatenate_low_rank(parts: list[tuple[LowRankDelta, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, alpha) with up @ down · alpha = Σ strengthᵢ · scaleᵢ · upᵢ @ downᵢ.

    One delta is used as it is; several are joined along the rank, each up factor scaled
    by its strength times its scale, so the whole sum is a single float32 GEMM.
    """
    if len(parts) == 1:
        delta, strength = parts[0]
        return delta.up, delta.down, strength * delta.scale
    up = torch.cat([delta.up * (strength * delta.scale) for delta, strength in parts], dim=1)
    down = torch.cat([delta.down for delta, _ in parts], dim=0)
    return up, down, 1.0


class WeightPatcher:
    """Owns the adaptable weights of one pipeline and the pristine copies of those touched.

    ``pristine_device`` keeps the copies elsewhere than the weights (``cpu``: host memory,
    pinned when the weights are on CUDA, for a card too small to hold both); each write
    then reads its copy across, and a restore copies it back, still bit-exact.
    """

    def __init__(
        self, components: dict[str, torch.nn.Module], pristine_device: torch.device | None = None
    ) -> None:
        self.components = components
        self.pristine_device = pristine_device
        self.index = ModuleIndex(components)
        self._params: dict[str, torch.nn.Parameter] = {}
        self._pristine: dict[str, torch.Tensor] = {}
        # A LoRA parsed ahead for a waiting job (DoRA) may ask for a pristine weight while
        # apply writes the live one: the first touch's copy is taken under this lock, and
        # apply takes it before it writes, so a copy is always of the pristine weight.
        self._pristine_lock = threading.Lock()
        self._applied: dict[str, Contribution] = {}
        self._touched: set[str] = set()  # may differ from W₀: applied, or a write under way
        self._workspaces: dict[torch.device, torch.Tensor] = {}

    @property
    def pristine_bytes(self) -> int:
        return sum(t.nbytes for t in self._pristine.values())

    def pristine_bytes_on(self, device: torch.device | None) -> int:
        """The pristine copies' bytes on ``device`` (all of them for None)."""
        return sum(t.nbytes for t in self._pristine.values() if device is None or t.device == device)

    @property
    def is_pristine(self) -> bool:
        """True when no parameter carries a LoRA (nothing is applied)."""
        return not self._touched

    def parameter(self, key: str) -> torch.nn.Parameter:
        """The live parameter of a target key (``unet:down_blocks.0...weight``)."""
        param = self._params.get(key)
        if param is None:
            param = self.index.parameter(self.components, self.index.targets[key])
            self._params[key] = param
        return param

    def original(self, target: Target) -> torch.Tensor:
        """The pristine weight W₀ of ``target`` (kept from its first touch on)."""
        return self._original(target.key)

    def _original(self, key: str) -> torch.Tensor:
        with self._pristine_lock:
            copy = self._pristine.get(key)
            if copy is None:
                param = self.parameter(key).detach()
                if self.pristine_device is None or self.pristine_device == param.device:
                    copy = param.clone()
                else:
                    pin = param.device.type == "cuda" and self.pristine_device.type == "cpu"
                    copy = torch.empty(
                        param.shape, dtype=param.dtype, device=self.pristine_device, pin_memory=pin
                    )
                    copy.copy_(param)
                self._pristine[key] = copy
            return copy

    @staticmethod
    def plan(stack: list[StackEntry]) -> dict[str, list[tuple[Delta, float]]]:
        """Per touched parameter key, the (delta, strength) pairs the stack adds to it, in order."""
        plan: dict[str, list[tuple[Delta, float]]] = {}
        for entry in stack:
            for delta in entry.lora.deltas:
                strength = (
                    entry.text_encoder_strength if delta.target.is_text_encoder else entry.unet_strength
                )
                if strength == 0.0:
                    continue
                plan.setdefault(delta.target.key, []).append((delta, strength))
        return plan

    @torch.no_grad()
    def apply(self, stack: list[StackEntry]) -> PatchTimings:
        """Make the weights equal W₀ plus exactly this stack (see the module docstring)."""
        timings = PatchTimings()
        plan = self.plan(stack)
        wanted = {key: tuple((id(d), s) for d, s in parts) for key, parts in plan.items()}
        try:
            start = time.perf_counter()
            for key in [k for k in self._touched if k not in wanted]:
                self.parameter(key).copy_(self._pristine[key])
                self._touched.discard(key)
                self._applied.pop(key, None)
                timings.restored += 1
            timings.restore = time.perf_counter() - start
            start = time.perf_counter()
            for key, parts in plan.items():
                if self._applied.get(key) == wanted[key]:
                    continue
                self._write(key, parts)
                self._applied[key] = wanted[key]
                timings.written += 1
            timings.apply = time.perf_counter() - start
        except BaseException:
            self.restore()
            raise
        return timings

    def _write(self, key: str, parts: list[tuple[Delta, float]]) -> None:
        param = self.parameter(key)
        if getattr(param, "quant_type", None) is not None:
            raise JobFailed(
                f"{key} is a GGUF-quantized weight: requantizing a merged LoRA would be lossy and "
                "could not be restored, so a GGUF model takes LoRAs beside its weights only (lora_mode side)"
            )
        original = self._original(key)
        self._applied.pop(key, None)  # until the write completes, the state is unknown
        self._touched.add(key)
        rows = param.shape[0]
        target = param.detach().view(rows, -1)
        original = original.to(param.device, non_blocking=True)  # a no-op unless kept in host memory
        base = original.view(rows, -1)
        low_rank = [(d, s) for d, s in parts if isinstance(d, LowRankDelta)]
        others = [(d, s) for d, s in parts if not isinstance(d, LowRankDelta)]
        # float32 parameters accumulate in place; others in a float32 workspace, rounded once.
        acc = (
            target
            if param.dtype == torch.float32
            else self._workspace(param.numel(), param.device).view(rows, -1)
        )
        if low_rank:
            up, down, alpha = concatenate_low_rank(low_rank)
            if acc is target:
                torch.addmm(base, up, down, alpha=alpha, out=acc)
            else:
                acc.copy_(base)
                acc.addmm_(up, down, alpha=alpha)
        else:
            acc.copy_(base)
        for delta, strength in others:
            delta.add_to(acc, strength, original)
        if acc is not target:
            target.copy_(acc)

    def _workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer kept per device (no allocation, no page faults per write)."""
        buffer = self._workspaces.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._workspaces[device] = buffer
        return buffer[:numel]

    @torch.no_grad()
    def restore(self) -> PatchTimings:
        """Copy every parameter that may carry a LoRA back from its pristine copy."""
        start = time.perf_counter()
        count = len(self._touched)
        for key in self._touched:
            self.parameter(key).copy_(self._pristine[key])
        self._touched.clear()
        self._applied.clear()
        return PatchTimings(restore=time.perf_counter() - start, restored=count)
