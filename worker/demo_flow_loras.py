"""Demo LoRAs for the flow-matching families, in the formats their users bring.

A family's formats differ in three things only (``LoraFormat``): which names a file gives a
layer, the original code's (worker/lora/original_names.py: BFL's FLUX names, Z-Image's
fused ``attention.qkv``) or diffusers'; the prefix before them (one ending in ``_``, as
kohya's ``lora_unet_`` or LyCORIS' ``lycoris_``, flattens the dots); and the tensors that
store the delta (PEFT ``lora_A``/``lora_B``, with or without PEFT's ``.default`` adapter
name; kohya ``lora_down``/``lora_up`` with alpha = rank / 2; LyCORIS LoKr and LoHa with
alpha = rank; XLabs' FLUX.1 processors). Each family adapts the attention and MLP linears of
every block (``ADAPTED``); FLUX.1's formats also its modulations and final layer, and
kohya's FLUX.1 file CLIP's q and v projections.

Every format is written from one random low-rank pair per original layer: a file with
diffusers' names gets a fused layer's up factor dealt out by rows and its down factor shared
(as diffusers' converters do); LoKr and LoHa, which cannot be dealt out, get one layer per
diffusers module instead. Deterministic for a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.common.schema.family import Family
from lorafleet.worker.lora.original_names import Piece, original_names


@dataclass(frozen=True)
class LoraFormat:
    """How one trainer (or tool) names and stores a LoRA's layers."""

    names: str
    """``original``: the original code's layers, a fused one whole; ``diffusers``: diffusers' modules."""
    prefix: str
    """Written before each layer name; one ending in ``_`` flattens the name's dots."""
    tensors: str
    """``lora_AB``, ``lora_AB.default`` (PEFT adapter names), ``kohya``, ``lokr``, ``loha``, ``xlabs``."""
    only: tuple[str, ...] = ()
    """Endings of the original layer names it adapts; empty: every layer the family adapts."""
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder: str | None = None
    """Flat prefix of the CLIP q and v projections it adapts too (kohya's FLUX.1 ``lora_te1_``)."""


def _kohya(version: str, network: str) -> dict[str, str]:
    return {"ss_base_model_version": version, "ss_network_module": network}


FORMATS: dict[Family, dict[str, LoraFormat]] = {
    Family.flux1: {
        "kohya": LoraFormat(
            "original", "lora_unet_", "kohya", (), _kohya("flux1", "networks.lora_flux"), "lora_te1_"
        ),
        "bfl": LoraFormat(
            "original", "diffusion_model.", "lora_AB", metadata={"modelspec.architecture": "flux-1-dev/lora"}
        ),
        "peft": LoraFormat("diffusers", "transformer.", "lora_AB"),
        "onetrainer": LoraFormat("diffusers", "lora_transformer_", "kohya"),
        "xlabs": LoraFormat("original", "", "xlabs", ("_attn.qkv", "_attn.proj")),
        "lokr": LoraFormat(
            "original", "lora_unet_", "lokr", ("img_attn.qkv", "linear1"), _kohya("flux1", "lycoris.kohya")
        ),
        "loha": LoraFormat(
            "original", "lora_unet_", "loha", ("img_attn.qkv", "linear1"), _kohya("flux1", "lycoris.kohya")
        ),
    },
    Family.zimage: {
        "peft": LoraFormat("diffusers", "transformer.", "lora_AB"),
        # ComfyUI's names (Lumina 2's NextDiT): ``attention.qkv`` fused, ``attention.out``.
        "original": LoraFormat("original", "diffusion_model.", "lora_AB"),
        # musubi-tuner's export for ComfyUI: the same names flattened, alpha.
        "kohya": LoraFormat(
            "original", "lora_unet_", "kohya", metadata=_kohya("zimage", "networks.lora_zimage")
        ),
        # musubi-tuner as it trains: diffusers' names flattened (to_q, to_out_0), alpha.
        "musubi": LoraFormat(
            "diffusers", "lora_unet_", "kohya", metadata=_kohya("zimage", "networks.lora_zimage")
        ),
        "lokr": LoraFormat("diffusers", "lora_unet_", "lokr", metadata=_kohya("zimage", "networks.lokr")),
    },
    Family.qwenimage: {
        "peft": LoraFormat("diffusers", "transformer.", "lora_AB"),
        # DiffSynth-Studio: bare names, PEFT's adapter name left in the keys.
        "diffsynth": LoraFormat("diffusers", "", "lora_AB.default"),
        "kohya": LoraFormat(
            "diffusers", "lora_unet_", "kohya", metadata=_kohya("qwen_image", "networks.lora_qwen_image")
        ),
        "original": LoraFormat("original", "diffusion_model.", "lora_AB"),  # ComfyUI, ai-toolkit
    },
    Family.flux2: {
        "peft": LoraFormat("diffusers", "transformer.", "lora_AB"),
        "kohya": LoraFormat(
            "original", "lora_unet_", "kohya", metadata=_kohya("flux2", "networks.lora_flux_2")
        ),
        "original": LoraFormat("original", "diffusion_model.", "lora_AB"),  # ai-toolkit, ComfyUI
        "lokr": LoraFormat("original", "lora_unet_", "lokr", metadata=_kohya("flux2", "networks.lokr")),
        # SimpleTuner: LyCORIS wraps diffusers' model, its names flattened after ``lycoris_``.
        "simpletuner": LoraFormat("diffusers", "lycoris_", "lokr"),
    },
}
"""Per family, its demo formats in the order written (file ``<family>-<format>.safetensors``)."""

FLUX1_FORMATS = tuple(FORMATS[Family.flux1])
"""The FLUX.1 LoRA formats (each a demo file ``flux1-<format>``)."""

ADAPTED = {
    Family.flux1: re.compile(r"(double_blocks|single_blocks)\.|final_layer\.adaLN"),
    Family.zimage: re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\."),
    Family.qwenimage: re.compile(r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp)\."),
    Family.flux2: re.compile(r"(double|single)_blocks\.\d+\."),
}
"""Per family, the original layer names its demo LoRAs adapt (matched at the start)."""


def _pair(rows: int, cols: int, rank: int, gen: torch.Generator, strength: float):
    down = torch.randn(rank, cols, generator=gen) * strength
    up = torch.randn(rows, rank, generator=gen) * strength
    return down, up


def _factor_pair(n: int) -> tuple[int, int]:
    """n = a * b with a the largest divisor of n up to its square root (LoKr's split)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def _rows(pieces: list[Piece]) -> int:
    return sum(b - a for piece in pieces for a, b in piece.rows)


def _layers(transformer: torch.nn.Module, family: Family, fmt: LoraFormat) -> list[tuple[str, list[Piece]]]:
    """The layers a file of ``fmt`` holds: its name for each and the diffusers modules it
    stacks. A linear no original name covers is named as diffusers names it."""
    names = original_names(transformer)
    covered = {piece.module for pieces in names.values() for piece in pieces}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in covered:
            names[name] = [Piece(name, ((0, module.out_features),))]
    layers = [
        (original, pieces)
        for original, pieces in names.items()
        if ADAPTED[family].match(original) and (not fmt.only or original.endswith(fmt.only))
    ]
    if fmt.names == "diffusers" and fmt.tensors in ("lokr", "loha"):
        modules = [piece.module for _, pieces in layers for piece in pieces]
        layers = [(m, [Piece(m, ((0, transformer.get_submodule(m).out_features),))]) for m in modules]
    return layers


def _key(fmt: LoraFormat, name: str) -> str:
    return fmt.prefix + (name.replace(".", "_") if fmt.prefix.endswith("_") else name)


def _low_rank(
    fmt: LoraFormat, key: str, down: torch.Tensor, up: torch.Tensor, rank: int
) -> dict[str, torch.Tensor]:
    if fmt.tensors == "kohya":
        return {
            f"{key}.lora_down.weight": down,
            f"{key}.lora_up.weight": up,
            f"{key}.alpha": torch.tensor(rank / 2),
        }
    adapter = ".default" if fmt.tensors == "lora_AB.default" else ""
    return {f"{key}.lora_A{adapter}.weight": down, f"{key}.lora_B{adapter}.weight": up}


def _xlabs_key(original: str) -> str:
    block, stream, layer = original.split(".")[1], original.split(".")[2][:3], original.split(".")[3]
    return f"double_blocks.{block}.processor.{layer}_lora{1 if stream == 'img' else 2}"


def lora_state(
    transformer: torch.nn.Module,
    family: Family,
    fmt: str,
    *,
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.05,
    text_encoder: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA of ``family`` for ``transformer`` in format ``fmt`` (one of ``FORMATS[family]``)."""
    formats = FORMATS.get(family, {})
    if fmt not in formats:
        raise ValueError(f"{family} format must be one of {', '.join(formats)}, got {fmt!r}")
    spec = formats[fmt]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for original, pieces in _layers(transformer, family, spec):
        rows, cols = _rows(pieces), transformer.get_submodule(pieces[0].module).weight.shape[1]
        down, up = _pair(rows, cols, rank, gen, strength)
        key = _key(spec, original)
        if spec.tensors == "xlabs":
            state |= {f"{_xlabs_key(original)}.down.weight": down, f"{_xlabs_key(original)}.up.weight": up}
        elif spec.tensors == "lokr":
            (a, b), (c, d) = _factor_pair(rows), _factor_pair(cols)
            state[f"{key}.lokr_w1"] = torch.randn(a, c, generator=gen) * strength
            w2_a = torch.randn(b, rank, generator=gen) * strength
            state |= {
                f"{key}.lokr_w2_a": w2_a,
                f"{key}.lokr_w2_b": torch.randn(rank, d, generator=gen) * strength,
            }
            state[f"{key}.alpha"] = torch.tensor(float(rank))
        elif spec.tensors == "loha":
            for n in ("1", "2"):
                w_down, w_up = _pair(rows, cols, rank, gen, strength**0.5)
                state |= {f"{key}.hada_w{n}_a": w_up, f"{key}.hada_w{n}_b": w_down}
            state[f"{key}.alpha"] = torch.tensor(float(rank))
        elif spec.names == "original":
            state |= _low_rank(spec, key, down, up, rank)
        else:
            for piece in pieces:
                state |= _low_rank(
                    spec, _key(spec, piece.module), down.clone(), up[piece.index()].contiguous(), rank
                )
    if spec.text_encoder and text_encoder is not None:
        for name, module in text_encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj")):
                down, up = _pair(module.out_features, module.in_features, rank, gen, strength)
                state |= _low_rank(spec, spec.text_encoder + name.replace(".", "_"), down, up, rank)
    return state


def make_flow_demo_loras(
    components: dict[str, torch.nn.Module],
    family: Family,
    out_dir: Path,
    seed: int = 0,
    strength: float = 0.05,
) -> list[Path]:
    """Write one demo LoRA per format of ``family`` for ``components`` into ``out_dir``."""
    from safetensors.torch import save_file

    if family not in FORMATS:
        raise ValueError(f"demo LoRAs for {family.traits.label} are not written yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (fmt, spec) in enumerate(FORMATS[family].items()):
        state = lora_state(
            components["transformer"],
            family,
            fmt,
            seed=seed + index,
            strength=strength,
            text_encoder=components.get("text_encoder"),
        )
        path = out_dir / f"{family}-{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=spec.metadata)
        written.append(path)
    return written
