"""Single-file checkpoints of the flow-matching families: the transformer alone, in its
original code's names, the rest of the pipeline from a base.

Most FLUX.1, Z-Image, Qwen-Image and FLUX.2 downloads are the transformer only, named as
the original code names it (``double_blocks.0.img_attn.qkv.weight``, Z-Image's
``layers.0.attention.qkv.weight``), often with ComfyUI's ``model.diffusion_model.`` or
``diffusion_model.`` in front and often in fp8 (e4m3fn). diffusers' own single-file
conversion of FLUX.1 assumes the full-size geometry (width 3072): this one is built from the
model's own shapes (worker/lora/original_names.py), so a tiny test model and the 12B one
share it, and a file already in diffusers' names is taken as it is.

Semantics:
- Reading: each original layer's weight and bias is dealt out by rows to diffusers' modules
  (``Piece``), RMSNorm scales are renamed; a tensor that maps to nothing, or a diffusers
  parameter no tensor fills, refuses the file naming the first such name.
- A file that carries the text encoders and VAE too (ComfyUI's all-in-one FLUX.1:
  ``text_encoders.clip_l.``, ``text_encoders.t5xxl.``, ``vae.``) runs with its own; only
  the tokenizers and configs come from the base then.
- fp8 files stay fp8 in memory and are upcast per layer as each layer runs (diffusers'
  layerwise casting, ComfyUI's way): a LoRA is merged in float32 and rounded back to fp8
  once, to nearest, the same way every time, and restore copies the pristine fp8 tensor back.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lora.original_names import original_names, original_norms

logger = logging.getLogger(__name__)

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
FP8 = torch.float8_e4m3fn
UNUSED = {"norm_final.weight"}
"""Tensors of original checkpoints that diffusers' models have no place for (Z-Image's unused
final norm), skipped as diffusers' own conversion skips them."""


ALL_IN_ONE = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.t5xxl.transformer.",
    "vae": "vae.",
}
"""ComfyUI's all-in-one FLUX.1 files: each component's prefix (the transformer's is
``model.diffusion_model.``). CLIP and T5 keep transformers' names; the VAE has the original
(LDM) names, converted with diffusers' own converter."""


def split_all_in_one(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the transformer's tensors, the other components' tensors by component) of a file; a
    transformer-only file gives no other components."""
    others = {
        name: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        for name, prefix in ALL_IN_ONE.items()
    }
    others = {name: part for name, part in others.items() if part}
    if not others:
        return state, {}
    transformer = {k: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIXES[0])}
    return transformer, others


def load_components(pipe, parts: dict[str, dict], source: str, dtype: torch.dtype) -> None:
    """The file's own text encoders and VAE into ``pipe`` (its base's are replaced, tensor
    for tensor); JobFailed names a component whose tensors do not fit."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for name, part in parts.items():
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise JobFailed(f"{source}: holds a {name} but the base's pipeline has none")
        if name == "vae":
            part = convert_ldm_vae_checkpoint({f"vae.{k}": v for k, v in part.items()}, dict(module.config))
        wanted = module.state_dict()
        if "shared.weight" in part and "encoder.embed_tokens.weight" in wanted:  # T5's tied embedding
            part.setdefault("encoder.embed_tokens.weight", part["shared.weight"])
        if set(part) != set(wanted):  # CLIP written with or without transformers' text_model. level
            flipped = {
                (k[len("text_model.") :] if k.startswith("text_model.") else f"text_model.{k}"): v
                for k, v in part.items()
            }
            part = flipped if set(flipped) >= set(wanted) - set(part) else part
        missing = sorted(set(wanted) - set(part))
        if missing:
            raise JobFailed(f"{source}: its {name} lacks {len(missing)} tensors (first: {missing[0]})")
        try:
            module.load_state_dict({k: part[k].to(dtype) for k in wanted}, strict=True)
        except RuntimeError as exc:
            raise JobFailed(
                f"{source}: its {name} does not fit the base's ({str(exc).splitlines()[0]})"
            ) from None
        logger.info("%s: %s read from the file", source, name)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ORIGINAL_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def transformer_from_original(
    state: dict[str, torch.Tensor], transformer: torch.nn.Module, source: str
) -> dict[str, torch.Tensor]:
    """The diffusers state dict of ``transformer`` from an original-named checkpoint's tensors
    (a diffusers-named file is taken as it is); JobFailed names what does not fit."""
    state = _strip_prefix(state)
    wanted = dict(transformer.state_dict())
    if set(state) == set(wanted):
        return state
    names, norms = original_names(transformer), original_norms(transformer)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        layer, _, param = key.rpartition(".")
        pieces = names.get(layer) if param in ("weight", "bias") else None
        if key in norms:
            converted[norms[key]] = tensor
        elif pieces is not None:
            for piece in pieces:
                converted[f"{piece.module}.{param}"] = tensor[piece.index()].contiguous()
        elif key in wanted:  # a name the original code and diffusers share
            converted[key] = tensor
        elif key not in UNUSED:
            raise JobFailed(f"{source}: tensor {key!r} is not part of a {type(transformer).__name__}")
    missing = sorted(set(wanted) - set(converted))
    if missing:
        raise JobFailed(
            f"{source}: {len(missing)} of the transformer's tensors are missing (first: {missing[0]}): "
            "a truncated file, or another model's"
        )
    for key, tensor in list(converted.items()):
        shape = tuple(getattr(tensor, "quant_shape", tensor.shape))  # a GGUF tensor's values, not bytes
        want = tuple(wanted[key].shape)
        if shape != want and shape == (math.prod(want),) and not hasattr(tensor, "quant_shape"):
            converted[key] = tensor.reshape(want)  # stable-diffusion.cpp's 1-D pad tokens: (1, width)
        elif shape != want:
            raise JobFailed(
                f"{source}: {key} is {shape} in the file but {tuple(wanted[key].shape)} in "
                "the base's transformer: the file is another size or variant than --base"
            )
    return converted


def transformer_to_original(transformer: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``transformer``'s weights under BFL's names (the files people download), rows joined."""
    state = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    names = original_names(transformer)
    covered = {
        f"{piece.module}.{param}"
        for pieces in names.values()
        for piece in pieces
        for param in ("weight", "bias")
    }
    for original, pieces in names.items():
        for param in ("weight", "bias"):
            parts = [(piece, state.get(f"{piece.module}.{param}")) for piece in pieces]
            if any(tensor is None for _, tensor in parts):
                continue
            rows = sum(b - a for piece, _ in parts for a, b in piece.rows)
            whole = torch.empty((rows, *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
            for piece, tensor in parts:
                whole[piece.index()] = tensor
            out[f"{prefix}{original}.{param}"] = whole
    norms = original_norms(transformer)
    for original, name in norms.items():
        out[f"{prefix}{original}"] = state[name].clone()
    for name, tensor in state.items():  # what keeps diffusers' name in the original code
        if name not in covered and name not in norms.values():
            out[f"{prefix}{name}"] = tensor.clone()
    return out


TRANSFORMER_CLASS = {
    "FluxPipeline": "FluxTransformer2DModel",
    "ZImagePipeline": "ZImageTransformer2DModel",
    "QwenImagePipeline": "QwenImageTransformer2DModel",
    "Flux2KleinPipeline": "Flux2Transformer2DModel",
}
"""The transformer class of each flow pipeline."""


def upcast_per_layer(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Linear layers whose weight is stored in fp8 compute in ``compute_dtype``: the weight
    (and bias) are cast as the layer runs, never stored wider. Returns how many layers.

    diffusers' ``enable_layerwise_casting`` stores every parameter of a layer in one dtype;
    files keep fp8 weights beside bf16 biases and norms, so each tensor keeps its own here.
    Only ``fp8_weights`` are left fp8 at load; everything else is already ``compute_dtype``.
    """
    count = 0
    kept = fp8_weights(model)
    for name, module in model.named_modules():
        if f"{name}.weight" in kept and module.weight.dtype == FP8:
            module.forward = _upcast_forward(module, compute_dtype)
            count += 1
    return count


def fp8_weights(model: torch.nn.Module) -> set[str]:
    """The parameters an fp8 file's tensor may stay fp8 for: the weights of Linear layers
    outside the embedders (the models cast their inputs to an embedder's weight dtype, which
    would round timesteps to fp8). Every other fp8 tensor is upcast at load (exact)."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "embed" not in name
    }


def _upcast_forward(module: torch.nn.Linear, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return torch.nn.functional.linear(x, module.weight.to(compute_dtype), bias)

    return forward


def load_flow_checkpoint(path: Path, base: str, class_name: str, dtype: torch.dtype, local: bool):
    """The pipeline of ``base`` with its transformer read from the checkpoint at ``path``;
    fp8 weights stay fp8 (``upcast_per_layer``), every other tensor becomes ``dtype``."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    state, others = split_all_in_one(load_file(str(path)))
    transformer_class = getattr(diffusers, TRANSFORMER_CLASS[class_name])
    config = transformer_class.load_config(base, subfolder="transformer", local_files_only=local)
    with init_empty_weights():
        transformer = transformer_class.from_config(config)
    converted = transformer_from_original(state, transformer, path.name)
    kept = fp8_weights(transformer)
    converted = {k: v if v.dtype == FP8 and k in kept else v.to(dtype) for k, v in converted.items()}
    transformer.load_state_dict(converted, assign=True, strict=True)
    upcast_per_layer(transformer, dtype)
    pipe = getattr(diffusers, class_name).from_pretrained(
        base, transformer=transformer, dtype=dtype, local_files_only=local
    )
    load_components(pipe, others, path.name, dtype)
    return pipe
