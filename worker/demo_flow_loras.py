"""Demo LoRAs for the flow-matching families, in the formats their users bring.

For FLUX.1 every format in the wild is written from one set of factors per original layer
(worker/lora/original_names.py: BFL's names, where ``img_attn.qkv`` and ``linear1`` are
fused): kohya (``lora_unet_double_blocks_0_img_attn_qkv``, alpha = rank / 2, plus CLIP
``lora_te1_``), ai-toolkit / ComfyUI (``diffusion_model.`` BFL names, lora_A/lora_B),
diffusers / PEFT (``transformer.`` diffusers names: a fused layer's up factor split by rows,
its down factor shared), OneTrainer (``lora_transformer_`` flattened diffusers names), XLabs
(``double_blocks.N.processor.qkv_lora1``), and LyCORIS LoKr and LoHa on kohya names.
Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.common.schema.family import Family
from lorafleet.worker.lora.original_names import original_names

FLUX1_FORMATS = ("kohya", "bfl", "peft", "onetrainer", "xlabs", "lokr", "loha")
"""The FLUX.1 LoRA formats ``flux1_lora_state`` writes (each a demo file ``flux1-<format>``)."""

_METADATA = {
    "kohya": {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"},
    "lokr": {"ss_base_model_version": "flux1", "ss_network_module": "lycoris.kohya"},
    "loha": {"ss_base_model_version": "flux1", "ss_network_module": "lycoris.kohya"},
    "bfl": {"modelspec.architecture": "flux-1-dev/lora"},
}


def _pair(rows: int, cols: int, rank: int, gen: torch.Generator, strength: float):
    down = torch.randn(rank, cols, generator=gen) * strength
    up = torch.randn(rows, rank, generator=gen) * strength
    return down, up


def _factor_pair(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor of n up to its square root (LoKr's split)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def flux1_lora_state(
    transformer: torch.nn.Module,
    fmt: str,
    *,
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.05,
    text_encoder: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """A FLUX.1 LoRA for ``transformer`` in format ``fmt`` (one of FLUX1_FORMATS)."""
    if fmt not in FLUX1_FORMATS:
        raise ValueError(f"format must be one of {', '.join(FLUX1_FORMATS)}, got {fmt!r}")
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for original, pieces in original_names(transformer).items():
        if not original.startswith(("double_blocks.", "single_blocks.", "final_layer.adaLN")):
            continue
        if fmt == "xlabs" and not original.endswith(("_attn.qkv", "_attn.proj")):
            continue
        if fmt in ("lokr", "loha") and not original.endswith(("img_attn.qkv", "linear1")):
            continue
        weight = transformer.get_submodule(pieces[0].module).weight
        rows, cols = sum(b - a for p in pieces for a, b in p.rows), weight.shape[1]
        down, up = _pair(rows, cols, rank, gen, strength)
        flat = "lora_unet_" + original.replace(".", "_")
        if fmt == "kohya":
            state |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up}
            state[f"{flat}.alpha"] = torch.tensor(rank / 2)
        elif fmt == "bfl":
            state |= {f"diffusion_model.{original}.lora_A.weight": down, f"diffusion_model.{original}.lora_B.weight": up}
        elif fmt in ("peft", "onetrainer"):
            for piece in pieces:
                part = up[piece.index()].contiguous()
                if fmt == "peft":
                    state |= {f"transformer.{piece.module}.lora_A.weight": down.clone(), f"transformer.{piece.module}.lora_B.weight": part}
                else:
                    name = "lora_transformer_" + piece.module.replace(".", "_")
                    state |= {f"{name}.lora_down.weight": down.clone(), f"{name}.lora_up.weight": part}
                    state[f"{name}.alpha"] = torch.tensor(rank / 2)
        elif fmt == "xlabs":
            block, stream, layer = original.split(".")[1], original.split(".")[2][:3], original.split(".")[3]
            key = f"double_blocks.{block}.processor.{layer}_lora{1 if stream == 'img' else 2}"
            state |= {f"{key}.down.weight": down.clone(), f"{key}.up.weight": up.clone()}
        elif fmt == "lokr":
            (a, b), (c, d) = _factor_pair(rows), _factor_pair(cols)
            state[f"{flat}.lokr_w1"] = torch.randn(a, c, generator=gen) * strength
            w2_a = torch.randn(b, rank, generator=gen) * strength
            state |= {f"{flat}.lokr_w2_a": w2_a, f"{flat}.lokr_w2_b": torch.randn(rank, d, generator=gen) * strength}
            state[f"{flat}.alpha"] = torch.tensor(float(rank))
        else:  # loha
            for n in ("1", "2"):
                w_down, w_up = _pair(rows, cols, rank, gen, strength**0.5)
                state |= {f"{flat}.hada_w{n}_a": w_up, f"{flat}.hada_w{n}_b": w_down}
            state[f"{flat}.alpha"] = torch.tensor(float(rank))
    if fmt == "kohya" and text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj")):
                down, up = _pair(module.out_features, module.in_features, rank, gen, strength)
                flat = "lora_te1_" + name.replace(".", "_")
                state |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up}
                state[f"{flat}.alpha"] = torch.tensor(rank / 2)
    return state


def make_flow_demo_loras(
    components: dict[str, torch.nn.Module], family: Family, out_dir: Path, seed: int = 0, strength: float = 0.05
) -> list[Path]:
    """Write one demo LoRA per format of ``family`` for ``components`` into ``out_dir``."""
    from safetensors.torch import save_file

    if family is not Family.flux1:
        raise ValueError(f"demo LoRAs for {family.traits.label} are not written yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, fmt in enumerate(FLUX1_FORMATS):
        state = flux1_lora_state(
            components["transformer"],
            fmt,
            seed=seed + index,
            strength=strength,
            text_encoder=components.get("text_encoder"),
        )
        path = out_dir / f"flux1-{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=_METADATA.get(fmt, {}))
        written.append(path)
    return written
