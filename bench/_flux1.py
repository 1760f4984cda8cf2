"""The FLUX.1 side of bench/lora_switch.py: its transformer, its LoRA stacks, diffusers' calls.

The transformer is diffusers' ``FluxTransformer2DModel`` at FLUX.1's true width (24 heads x
128 = 3072, T5 4096 wide, CLIP pooled 768, 64 packed latent channels, guidance embedding,
RoPE axes 16/56/56) with fewer blocks than the 19 double and 38 single of the released
model (``--blocks D,S``; ``19,38`` is the whole 12B model), random weights N(0, 0.02)
drawn straight on the device. Or the tests' tiny FLUX.1 (``worker.tiny``).

LoRAs from worker/demo_flow_loras.py's ``lora_state`` (one random low-rank pair per BFL
layer): two rank-32 "style" LoRAs over every attention and MLP linear (``img_attn.qkv``,
``img_attn.proj``, ``img_mlp.0/2``, their ``txt_`` twins, single blocks' ``linear1`` and
``linear2``) and a rank-64 "turbo" LoRA (shaped like the 8-step turbo LoRAs) over every
layer the demo LoRAs adapt, modulations and the final layer's included. lorafleet gets them in kohya's format
(BFL names, fused ``qkv`` and ``linear1``, alpha = rank / 2); diffusers gets the same
factors in PEFT naming (``transformer.`` diffusers modules: a fused layer's up factor split
by rows, its down factor shared), which has no alpha, so diffusers' adapter weights are
the stack's strengths times 0.5: both sides add the same deltas.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from lorafleet.common.schema.family import Family
from lorafleet.worker.demo_flow_loras import lora_state
from lorafleet.worker.lora.original_names import original_names

FLUX1 = dict(
    patch_size=1,
    in_channels=64,
    num_attention_heads=24,
    attention_head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""FluxTransformer2DModel's arguments for FLUX.1 dev's width (its config.json); blocks apart."""

BLOCKS = (2, 4)
"""Default double and single blocks: the true width, a size that fits a 24 GiB CPU machine."""

STYLE_LAYERS = re.compile(
    r"(double_blocks\.\d+\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.[02])|single_blocks\.\d+\.linear[12])$"
)
"""BFL's attention and MLP linears: what a style LoRA adapts."""

KOHYA_SCALE = 0.5
"""alpha / rank of the kohya files (the PEFT ones have none: diffusers scales them by 1)."""


def build_transformer(shape: str, blocks: tuple[int, int], device: torch.device, dtype: torch.dtype):
    """FLUX.1's transformer at true width with ``blocks`` (double, single), or the tiny one."""
    from diffusers import FluxTransformer2DModel

    if shape == "tiny":
        from lorafleet.worker.tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as scratch:
            folder = make_tiny_model(Path(scratch) / "tiny", family="flux1")
            transformer = FluxTransformer2DModel.from_pretrained(str(folder / "transformer"))
        return transformer.to(device=device, dtype=dtype).eval()
    from accelerate import init_empty_weights

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**FLUX1, num_layers=blocks[0], num_single_layers=blocks[1])
    # No weights are initialised on the CPU (12B of them take minutes): drawn on the device.
    transformer = transformer.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in transformer.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    return transformer.eval()


def make_loras(transformer, third: str, dtype: torch.dtype = torch.bfloat16):
    """(kohya states, PEFT states, layers per LoRA) for style_a, style_b and ``third``, in
    ``dtype`` (bf16, as FLUX.1 LoRA files are stored).

    The PEFT file of a seed is checked to hold the kohya file's factors, dealt out: every
    diffusers module's down factor is its BFL layer's, its up factor that layer's rows.
    """
    originals = original_names(transformer)
    plan = {"style_a": (32, 1, True), "style_b": (32, 2, True), third: (64, 3, False)}
    kohya, peft, layers = {}, {}, {}
    for name, (rank, seed, style_only) in plan.items():
        full = lora_state(transformer, Family.flux1, "kohya", rank=rank, seed=seed, strength=0.05)
        split = lora_state(transformer, Family.flux1, "peft", rank=rank, seed=seed, strength=0.05)
        kept = [n for n in originals if ("lora_unet_" + n.replace(".", "_") + ".alpha") in full]
        if style_only:
            kept = [n for n in kept if STYLE_LAYERS.search(n)]
        kohya[name], peft[name] = {}, {}
        for original in kept:
            flat = "lora_unet_" + original.replace(".", "_")
            down, up = full[f"{flat}.lora_down.weight"], full[f"{flat}.lora_up.weight"]
            for piece in originals[original]:
                key = f"transformer.{piece.module}"
                a, b = split[f"{key}.lora_A.weight"], split[f"{key}.lora_B.weight"]
                if not (torch.equal(a, down) and torch.equal(b, up[piece.index()])):
                    raise AssertionError(f"{key}: the PEFT file is not the kohya file's {original} dealt out")
                peft[name] |= {f"{key}.lora_A.weight": a.to(dtype), f"{key}.lora_B.weight": b.to(dtype)}
            kohya[name] |= {
                k: full[k].to(dtype) for k in (f"{flat}.lora_down.weight", f"{flat}.lora_up.weight")
            }
            kohya[name][f"{flat}.alpha"] = full[f"{flat}.alpha"]
        layers[name] = len(kept)
    return kohya, peft, layers


def diffusers_calls(transformer, peft: dict[str, dict[str, torch.Tensor]], third: str):
    """(load_fuse(name, weight), unfuse_unload()) through the transformer's own PEFT mixin,
    as FluxPipeline.load_lora_weights / fuse_lora / unfuse_lora / unload_lora_weights call it."""

    def load_fuse(name: str, weight: float) -> None:
        for adapter in (name, third):
            transformer.load_lora_adapter(
                peft[adapter], prefix="transformer", adapter_name=adapter, low_cpu_mem_usage=True
            )
        transformer.set_adapters([name, third], [weight * KOHYA_SCALE, 0.35 * KOHYA_SCALE])
        transformer.fuse_lora(adapter_names=[name, third], lora_scale=1.0)

    def unfuse_unload() -> None:
        transformer.unfuse_lora()
        transformer.unload_lora()

    return load_fuse, unfuse_unload
