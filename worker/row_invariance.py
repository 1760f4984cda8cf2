"""Linear layers whose every row is computed the same way, wherever it sits in the batch.

A sampling call has a fixed number of rows (worker/run/batching.py), so every kernel sees one
shape whatever jobs share the call. That is not enough for the layers that see one row per
image: the time, text-pool and modulation projections get a (rows, features) input, and a
matrix product with so few rows is cut into a main block and a remainder handled by another
kernel, which rounds differently. Measured on this project's CPU (torch 2.13.0, the tiny
SD 1.5 UNet with the same image at every position of calls of 1 to 9 rows): at 5, 6, 7 and 9
rows the image's floats depend on its position, so on which jobs come before it; with these
layers computed as one product per row, every position of every row count gives the same
floats (bench/batch_determinism.py measures it on every family).

Semantics: ``linear(x, weight, bias)`` is ``F.linear`` up to rounding; for an input of more
than one batch row it computes each row's (tokens, in) x (in, out) product as one element of
a batched call (``torch.bmm`` over the rows, the weight broadcast), so every row's arithmetic
is that of every other row, whatever its position. Measured: a projection of a few text
tokens per row (Qwen-Image's ``txt_in`` on a 5-token negative prompt) is as position-dependent
as a one-token one, so every layer with a batch dimension is computed this way.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

MAX_FLAT_ROWS = 256
"""A 2-D input of more rows than this is taken for tokens of several images flattened
together (no diffusers model does that for a per-image projection): left to ``F.linear``."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with each batch row's product computed on its own."""
    rows = x.shape[0] if x.dim() > 1 else 1
    if rows < 2 or (x.dim() == 2 and rows > MAX_FLAT_ROWS):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, -1, x.shape[-1])
    out = torch.bmm(flat, weight.t().unsqueeze(0).expand(rows, -1, -1))
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def make_rows_independent(model: torch.nn.Module) -> int:
    """Give every plain Linear of ``model`` the row-independent forward; returns how many.
    Layers whose forward was already replaced (an fp8 weight's upcast, which calls
    ``linear`` itself) are left as they are, and so are Linear subclasses (a quantized
    layer's forward reads its weight its own way)."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
