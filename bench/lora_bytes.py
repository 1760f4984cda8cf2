"""Bytes a rank-32 LoRA touches, per family, and the H100 switch times the copy limit allows.

Each released transformer is built from its real configuration on the meta device
(accelerate's init_empty_weights: shapes only, no weights, instant), and so is SDXL's UNet
for comparison. A LoRA on "every attention and MLP linear" (``LINEARS``, diffusers' module
names) touches those linears' weights; counted per model, in bf16:

- touched: the bytes of every weight such a LoRA changes (biases are never touched);
- LoRA: its rank-32 factors in bf16, one (A, B) pair per diffusers module (PEFT's layout;
  a file with BFL's fused ``qkv`` names shares one A among q, k and v and is a little smaller);
- transformer: every parameter; with pristine copies: the transformer plus a copy of each
  touched weight, what lorafleet's patcher keeps on the device by default.

Switch times are bounds from memory traffic alone, computed, not measured: a restore reads
every touched weight's pristine copy and writes the weight (2 x touched bytes); an apply or
a switch between two stacks over the same layers reads the pristine copy and the LoRA factors
and writes the weight once (2 x touched + LoRA bytes). At an H100 SXM's HBM3 peak of
3.35 TB/s (NVIDIA's datasheet), and at 2.6 TB/s, about what a device-to-device copy achieves
on it. lorafleet's bf16 write today goes through a float32 workspace (patcher.py: read W0,
write the workspace, the GEMM reads and writes it, read it, write W): about 20 bytes per
touched element instead of 4, so about 5x the switch bound.

Configurations and sources:
- FLUX.1 dev / schnell 12B: FluxTransformer2DModel's defaults (19 double, 38 single blocks,
  24 heads x 128 = 3072) with FLUX.1 dev's 64 input channels, guidance embedding, RoPE axes
  16/56/56; common/catalog/family_keys.py GEOMETRIES.
- Z-Image 6B (Turbo): ZImageTransformer2DModel's defaults (dim 3840, 30 layers, 2 noise and
  2 context refiner layers, FFN 10240); GEOMETRIES.
- Qwen-Image 20B: QwenImageTransformer2DModel's defaults (60 blocks, 24 heads x 128); GEOMETRIES.
- FLUX.2 Klein 4B and 9B: Flux2Transformer2DModel (diffusers transformer_flux2.py: mlp_ratio
  3, 128 input channels) with 5 double + 20 single blocks, 24 heads x 128, Qwen3-4B
  embeddings 3 x 2560 = 7680 wide; and 8 + 24 blocks, 32 heads x 128, Qwen3-8B 3 x 4096 =
  12288; no guidance embedding (distilled). Widths and block counts: GEOMETRIES (BFL's
  Klein4BParams / Klein9BParams); text widths: InvokeAI's FLUX.2 Klein presets.
- SDXL's UNet: bench/_sd.py's SDXL configuration (the released one), attention and
  feed-forward linears of its transformer blocks.

    .venv/bin/python bench/lora_bytes.py               # the table and its JSON line (seconds)
    .venv/bin/python bench/lora_bytes.py --peak-tbs 4.8 --achievable-tbs 3.9   # an H200
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _sd
import torch

BF16 = 2
"""Bytes per bf16 element."""

_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
LINEARS = {
    "flux1": re.compile(
        rf"^(transformer_blocks\.\d+\.({_ATTN}|(ff|ff_context)\.net\.(0\.proj|2))"
        r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))$"
    ),
    "zimage": re.compile(
        r"^(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])$"
    ),
    "qwenimage": re.compile(rf"^transformer_blocks\.\d+\.({_ATTN}|(img_mlp|txt_mlp)\.net\.(0\.proj|2))$"),
    "flux2": re.compile(
        rf"^(transformer_blocks\.\d+\.({_ATTN}|(ff|ff_context)\.linear_(in|out))"
        r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))$"
    ),
    "sdxl": re.compile(
        r"\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"
    ),
}
"""Per architecture, the attention and MLP linears a LoRA on all of them adapts (module names).
Left out: modulations (adaLN, norm1.linear, img_mod), embedders, final layers, and SDXL's
proj_in / proj_out and ResNet layers."""


@dataclass(frozen=True)
class Model:
    label: str
    linears: str
    """Key of LINEARS."""
    build: Callable[[], torch.nn.Module]


def _flux1():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _zimage():
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel()


def _qwenimage():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel()


def _klein(double: int, single: int, heads: int, text_width: int):
    from diffusers import Flux2Transformer2DModel

    return lambda: Flux2Transformer2DModel(
        num_layers=double,
        num_single_layers=single,
        num_attention_heads=heads,
        attention_head_dim=128,
        joint_attention_dim=text_width,
        guidance_embeds=False,
    )


def _sdxl():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_sd.SDXL)


MODELS = (
    Model("FLUX.1 12B", "flux1", _flux1),
    Model("Z-Image 6B", "zimage", _zimage),
    Model("Qwen-Image 20B", "qwenimage", _qwenimage),
    Model("FLUX.2 Klein 4B", "flux2", _klein(5, 20, 24, 7680)),
    Model("FLUX.2 Klein 9B", "flux2", _klein(8, 24, 32, 12288)),
    Model("SDXL UNet 2.6B", "sdxl", _sdxl),
)
"""The released models, largest use first; SDXL last, for comparison."""


def _counted(names: list[str]) -> list[str]:
    """The counted modules, one line per kind of block: ``blocks.N.{leaves} x how many``."""
    kinds: dict[str, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))
    for name in names:
        prefix, block, leaf = re.match(r"^(.*(?:blocks|layers|refiner))\.(\d+)\.(.*)$", name).groups()
        blocks, leaves = kinds[re.sub(r"\.\d+\.", ".N.", prefix)]
        blocks.add(f"{prefix}.{block}")
        leaves.add(leaf)
    return [
        f"{kind}.N.{{{', '.join(sorted(leaves))}}} x {len(blocks)}"
        for kind, (blocks, leaves) in kinds.items()
    ]


def measure(model: Model, rank: int) -> dict:
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = model.build()
    pattern = LINEARS[model.linears]
    linears = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.search(name)
    ]
    touched = sum(m.weight.numel() for _, m in linears) * BF16
    lora = sum(rank * (m.in_features + m.out_features) for _, m in linears) * BF16
    whole = sum(p.numel() for p in module.parameters()) * BF16
    return {
        "modules": len(linears),
        "counted": _counted([name for name, _ in linears]),
        "touched_bytes": touched,
        "lora_bytes": lora,
        "transformer_bytes": whole,
        "with_pristine_bytes": whole + touched,
    }


def switch_times(row: dict, peak: float, achievable: float) -> dict:
    """Restore and switch bounds in seconds at ``peak`` and ``achievable`` bytes per second."""
    restore, switch = 2 * row["touched_bytes"], 2 * row["touched_bytes"] + row["lora_bytes"]
    return {
        "restore_peak_s": restore / peak,
        "switch_peak_s": switch / peak,
        "restore_achievable_s": restore / achievable,
        "switch_achievable_s": switch / achievable,
        "switch_today_bf16_achievable_s": (10 * row["touched_bytes"] + row["lora_bytes"]) / achievable,
    }


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--peak-tbs", type=float, default=3.35, help="peak memory bandwidth, TB/s (H100 SXM)")
    parser.add_argument("--achievable-tbs", type=float, default=2.6, help="achievable copy bandwidth, TB/s")
    args = parser.parse_args()
    peak, achievable = args.peak_tbs * 1e12, args.achievable_tbs * 1e12

    rows = {}
    for model in MODELS:
        row = measure(model, args.rank)
        rows[model.label] = row | switch_times(row, peak, achievable)

    print(
        f"A rank-{args.rank} LoRA on every attention and MLP linear, bf16; switch bounds from memory traffic "
        f"at {args.peak_tbs} TB/s (peak) / {args.achievable_tbs} TB/s (achievable copy)"
    )
    header = (
        f"{'':16} {'modules':>7} {'touched GB':>10} {'of model':>8} {'LoRA MB':>8} {'model GB':>8} "
        f"{'w/ pristine GB':>14} {'restore ms':>11} {'switch ms':>11}"
    )
    print(header)
    for label, row in rows.items():
        print(
            f"{label:16} {row['modules']:7d} {row['touched_bytes'] / 1e9:10.2f} "
            f"{row['touched_bytes'] / row['transformer_bytes']:8.0%} {row['lora_bytes'] / 1e6:8.1f} "
            f"{row['transformer_bytes'] / 1e9:8.2f} {row['with_pristine_bytes'] / 1e9:14.2f} "
            f"{row['restore_peak_s'] * 1e3:5.1f}/{row['restore_achievable_s'] * 1e3:5.1f} "
            f"{row['switch_peak_s'] * 1e3:5.1f}/{row['switch_achievable_s'] * 1e3:5.1f}"
        )
    print(
        "restore and switch: peak / achievable. lorafleet's bf16 write today moves ~20 bytes per touched "
        "element (a float32 workspace), not 4: ~5x the switch bound "
        + ", ".join(
            f"({label}: {r['switch_today_bf16_achievable_s'] * 1e3:.0f} ms)" for label, r in rows.items()
        )
    )
    for label, row in rows.items():
        print(f"{label}: " + "; ".join(row["counted"]))
    record = {
        "bench": "lora_bytes",
        "commit": commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "rank": args.rank,
        "dtype": "bfloat16",
        "bandwidth_tbs": {"peak": args.peak_tbs, "achievable": args.achievable_tbs},
        "models": rows,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
