"""The names a family's original code gives its layers, mapped onto diffusers' modules.

Black Forest Labs' FLUX code (and every tool built on it: kohya's sd-scripts, ai-toolkit,
ComfyUI, XLabs, transformer-only checkpoints) names layers its own way and fuses layers
that diffusers keeps apart: a double block's ``img_attn.qkv`` is diffusers' ``to_q``,
``to_k`` and ``to_v`` stacked by rows; a single block's ``linear1`` is ``to_q``, ``to_k``,
``to_v`` and ``proj_mlp``; ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with
its two halves in the other order (shift, scale against diffusers' scale, shift).

Semantics: an original layer maps to ``Piece``s; piece i is a diffusers module whose weight
(and bias) is the original's rows ``rows`` stacked in that order:

    W_diffusers[piece] = concat(W_original[a:b] for (a, b) in piece.rows)

The maps are built from the loaded model's own shapes (width, MLP width, block counts), so
they fit a tiny test model as they fit the 12B one; LoRA parsing (worker/lora/formats.py)
and single-file checkpoints (worker/checkpoint_format.py) share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    """One diffusers module made of some rows of an original layer."""

    module: str
    rows: tuple[tuple[int, int], ...]

    @property
    def whole(self) -> bool:
        """The piece is the original layer as it is (a rename, nothing split or reordered)."""
        return len(self.rows) == 1 and self.rows[0][0] == 0

    def index(self) -> torch.Tensor:
        return torch.cat([torch.arange(a, b) for a, b in self.rows])


OriginalNames = dict[str, list[Piece]]
"""Original layer path -> the diffusers modules it is made of."""


def _linear_rows(model: torch.nn.Module, module: str) -> int:
    return model.get_submodule(module).weight.shape[0]


def _split(model: torch.nn.Module, modules: list[str]) -> list[Piece]:
    """Pieces for an original layer that stacks ``modules`` by rows, in that order."""
    pieces, start = [], 0
    for module in modules:
        rows = _linear_rows(model, module)
        pieces.append(Piece(module, ((start, start + rows),)))
        start += rows
    return pieces


def _rename(model: torch.nn.Module, module: str) -> list[Piece]:
    return [Piece(module, ((0, _linear_rows(model, module)),))]


def _bfl_double_attention(transformer: torch.nn.Module, d: str, b: str) -> OriginalNames:
    """A BFL double block's attention (FLUX.1 and FLUX.2 alike): fused qkv per stream."""
    return {
        f"{d}.img_attn.qkv": _split(transformer, [f"{b}.attn.to_{x}" for x in "qkv"]),
        f"{d}.txt_attn.qkv": _split(transformer, [f"{b}.attn.add_{x}_proj" for x in "qkv"]),
        f"{d}.img_attn.proj": _rename(transformer, f"{b}.attn.to_out.0"),
        f"{d}.txt_attn.proj": _rename(transformer, f"{b}.attn.to_add_out"),
    }


def _swapped_halves(transformer: torch.nn.Module, module: str) -> list[Piece]:
    """BFL's final modulation: (shift, scale) where diffusers has (scale, shift)."""
    half = _linear_rows(transformer, module) // 2
    return [Piece(module, ((half, 2 * half), (0, half)))]


def flux1_names(transformer: torch.nn.Module) -> OriginalNames:
    """BFL's FLUX.1 layer names for a diffusers ``FluxTransformer2DModel``."""
    config = transformer.config
    names: OriginalNames = {
        "img_in": _rename(transformer, "x_embedder"),
        "txt_in": _rename(transformer, "context_embedder"),
        "time_in.in_layer": _rename(transformer, "time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": _rename(transformer, "time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer": _rename(transformer, "time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer": _rename(transformer, "time_text_embed.text_embedder.linear_2"),
        "final_layer.linear": _rename(transformer, "proj_out"),
    }
    if config.guidance_embeds:
        names["guidance_in.in_layer"] = _rename(transformer, "time_text_embed.guidance_embedder.linear_1")
        names["guidance_in.out_layer"] = _rename(transformer, "time_text_embed.guidance_embedder.linear_2")
    names["final_layer.adaLN_modulation.1"] = _swapped_halves(transformer, "norm_out.linear")
    for n in range(config.num_layers):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        names |= {
            **_bfl_double_attention(transformer, d, b),
            f"{d}.img_mlp.0": _rename(transformer, f"{b}.ff.net.0.proj"),
            f"{d}.img_mlp.2": _rename(transformer, f"{b}.ff.net.2"),
            f"{d}.txt_mlp.0": _rename(transformer, f"{b}.ff_context.net.0.proj"),
            f"{d}.txt_mlp.2": _rename(transformer, f"{b}.ff_context.net.2"),
            f"{d}.img_mod.lin": _rename(transformer, f"{b}.norm1.linear"),
            f"{d}.txt_mod.lin": _rename(transformer, f"{b}.norm1_context.linear"),
        }
    for n in range(config.num_single_layers):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        names |= {
            f"{s}.linear1": _split(transformer, [*(f"{b}.attn.to_{x}" for x in "qkv"), f"{b}.proj_mlp"]),
            f"{s}.linear2": _rename(transformer, f"{b}.proj_out"),
            f"{s}.modulation.lin": _rename(transformer, f"{b}.norm.linear"),
        }
    return names


def flux1_norms(transformer: torch.nn.Module) -> dict[str, str]:
    """BFL's parameter names of FLUX.1's RMSNorm scales -> diffusers' (checkpoints only)."""
    norms = {}
    for n in range(transformer.config.num_layers):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}.attn"
        norms |= {
            f"{d}.img_attn.norm.query_norm.scale": f"{b}.norm_q.weight",
            f"{d}.img_attn.norm.key_norm.scale": f"{b}.norm_k.weight",
            f"{d}.txt_attn.norm.query_norm.scale": f"{b}.norm_added_q.weight",
            f"{d}.txt_attn.norm.key_norm.scale": f"{b}.norm_added_k.weight",
        }
    for n in range(transformer.config.num_single_layers):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}.attn"
        norms |= {
            f"{s}.norm.query_norm.scale": f"{b}.norm_q.weight",
            f"{s}.norm.key_norm.scale": f"{b}.norm_k.weight",
        }
    return norms


def _blocks(transformer: torch.nn.Module, name: str) -> int:
    blocks = getattr(transformer, name, None)
    return len(blocks) if blocks is not None else 0


def zimage_names(transformer: torch.nn.Module) -> OriginalNames:
    """Z-Image's original layer names (Tongyi's code; ComfyUI, musubi-tuner) for a diffusers
    ``ZImageTransformer2DModel``: a fused ``attention.qkv``, ``attention.out``,
    ``final_layer`` and ``x_embedder`` for the 2x2 patch; every other name is diffusers'."""
    names: OriginalNames = {}
    for stack in ("layers", "noise_refiner", "context_refiner"):
        for n in range(_blocks(transformer, stack)):
            a = f"{stack}.{n}.attention"
            names[f"{a}.qkv"] = _split(transformer, [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"])
            names[f"{a}.out"] = _rename(transformer, f"{a}.to_out.0")
    for diffusers_name, original in (
        ("all_final_layer.2-1.linear", "final_layer.linear"),
        ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
        ("all_x_embedder.2-1", "x_embedder"),
    ):
        try:
            names[original] = _rename(transformer, diffusers_name)
        except AttributeError:
            continue  # another patch size: its layers keep diffusers' names
    return names


def flux2_names(transformer: torch.nn.Module) -> OriginalNames:
    """BFL's FLUX.2 layer names for a diffusers ``Flux2Transformer2DModel`` (Klein): double
    blocks as FLUX.1's with shared modulations; a single block's ``linear1`` is diffusers'
    ``to_qkv_mlp_proj`` as it is."""
    names: OriginalNames = {
        "img_in": _rename(transformer, "x_embedder"),
        "txt_in": _rename(transformer, "context_embedder"),
        "time_in.in_layer": _rename(transformer, "time_guidance_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": _rename(transformer, "time_guidance_embed.timestep_embedder.linear_2"),
        "double_stream_modulation_img.lin": _rename(transformer, "double_stream_modulation_img.linear"),
        "double_stream_modulation_txt.lin": _rename(transformer, "double_stream_modulation_txt.linear"),
        "single_stream_modulation.lin": _rename(transformer, "single_stream_modulation.linear"),
        "final_layer.linear": _rename(transformer, "proj_out"),
    }
    if transformer.config.get("guidance_embeds"):
        names["guidance_in.in_layer"] = _rename(transformer, "time_guidance_embed.guidance_embedder.linear_1")
        names["guidance_in.out_layer"] = _rename(
            transformer, "time_guidance_embed.guidance_embedder.linear_2"
        )
    names["final_layer.adaLN_modulation.1"] = _swapped_halves(transformer, "norm_out.linear")
    for n in range(transformer.config.num_layers):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        names |= {
            **_bfl_double_attention(transformer, d, b),
            f"{d}.img_mlp.0": _rename(transformer, f"{b}.ff.linear_in"),
            f"{d}.img_mlp.2": _rename(transformer, f"{b}.ff.linear_out"),
            f"{d}.txt_mlp.0": _rename(transformer, f"{b}.ff_context.linear_in"),
            f"{d}.txt_mlp.2": _rename(transformer, f"{b}.ff_context.linear_out"),
        }
    for n in range(transformer.config.num_single_layers):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        names |= {
            f"{s}.linear1": _rename(transformer, f"{b}.attn.to_qkv_mlp_proj"),
            f"{s}.linear2": _rename(transformer, f"{b}.attn.to_out"),
        }
    return names


ORIGINAL_NAMES = {
    "FluxTransformer2DModel": flux1_names,
    "ZImageTransformer2DModel": zimage_names,
    "Flux2Transformer2DModel": flux2_names,
}
"""Per diffusers transformer class, the function that maps its original layer names
(Qwen-Image's original names are diffusers' own)."""


def zimage_norms(transformer: torch.nn.Module) -> dict[str, str]:
    """Z-Image's original parameter names of its q/k RMSNorm scales -> diffusers'."""
    norms = {}
    for stack in ("layers", "noise_refiner", "context_refiner"):
        for n in range(_blocks(transformer, stack)):
            a = f"{stack}.{n}.attention"
            norms |= {f"{a}.q_norm.weight": f"{a}.norm_q.weight", f"{a}.k_norm.weight": f"{a}.norm_k.weight"}
    return norms


def flux2_norms(transformer: torch.nn.Module) -> dict[str, str]:
    """BFL's FLUX.2 parameter names of its RMSNorm scales -> diffusers' (as FLUX.1's)."""
    return flux1_norms(transformer)


ORIGINAL_NORMS = {
    "FluxTransformer2DModel": flux1_norms,
    "ZImageTransformer2DModel": zimage_norms,
    "Flux2Transformer2DModel": flux2_norms,
}
"""Per diffusers transformer class, its norm scales' original names (checkpoints only)."""


def original_norms(transformer: torch.nn.Module) -> dict[str, str]:
    build = ORIGINAL_NORMS.get(type(transformer).__name__)
    return build(transformer) if build is not None else {}


def original_names(transformer: torch.nn.Module) -> OriginalNames:
    """The original layer names of ``transformer`` (empty for a model without a map)."""
    build = ORIGINAL_NAMES.get(type(transformer).__name__)
    return build(transformer) if build is not None else {}
