"""diffusers names -> the original (LDM/SGM) names of a single-file checkpoint.

A1111, Forge, ComfyUI and Civitai keep a Stable Diffusion model in one .safetensors file with
the names of the original training code: ``model.diffusion_model.`` (the UNet),
``first_stage_model.`` (the VAE), ``cond_stage_model.transformer.`` (SD 1.x's CLIP text
encoder), ``cond_stage_model.model.`` (SD 2.x's OpenCLIP) and ``conditioner.embedders.0/1.``
(SDXL's two encoders). diffusers reads such files (``from_single_file``) but does not write
them; this module writes them, so that tests and the demo have real single-file
checkpoints made from the tiny offline pipelines, and so that the round trip (folder ->
file -> diffusers' loader) can be checked weight by weight.

Semantics: every tensor of the UNet, the VAE and the text encoders is written once, under
its original name; the VAE's mid-block attention projections become 1x1 convolutions (as
in the original code); OpenCLIP's q, k and v projections are joined into ``in_proj`` and
its text projection is stored transposed. Nothing else changes: values and dtypes are kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorafleet.worker.lora.module_index import ldm_block_prefixes, ldm_name

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers UNet's state dict under the original names."""
    prefixes = ldm_block_prefixes(config)
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name = ldm_name(module, prefixes)
        if name is None:
            raise ValueError(f"UNet parameter {key!r} has no original name")
        out[f"{UNET_PREFIX}{name}.{param}"] = value
    return out


def _vae_name(key: str, up_blocks: int) -> str:
    side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
    if match := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest):
        kind, block, part, index, tail = match.groups()
        number = int(block) if kind == "down" else up_blocks - 1 - int(block)
        if part == "resnets":
            head, _, param = tail.rpartition(".")
            rest = f"{kind}.{number}.block.{index}.{_VAE_RESNET.get(head, head)}.{param}"
        else:
            rest = f"{kind}.{number}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    elif match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        head, _, param = match.group(2).rpartition(".")
        rest = f"mid.block_{int(match.group(1)) + 1}.{_VAE_RESNET.get(head, head)}.{param}"
    elif match := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
        rest = f"mid.attn_1.{_VAE_ATTENTION[match.group(1)]}.{match.group(2)}"
    elif rest.startswith("conv_norm_out."):
        rest = "norm_out." + rest.removeprefix("conv_norm_out.")
    return f"{VAE_PREFIX}{side + '.' if side else ''}{rest}"


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict under the original names."""
    up_blocks = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        name = _vae_name(key, up_blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out[name] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state dict under ``prefix`` (with the ``text_model.`` level)."""
    out = {}
    for key, value in state.items():
        inner = (
            key if key.startswith("text_model.") or key == "text_projection.weight" else f"text_model.{key}"
        )
        out[prefix + inner] = value
    return out


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder (with projection) in OpenCLIP's layout under ``prefix``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        f"{prefix}token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        f"{prefix}positional_embedding": state.pop("embeddings.position_embedding.weight"),
        f"{prefix}ln_final.weight": state.pop("final_layer_norm.weight"),
        f"{prefix}ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out[f"{prefix}text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for layer in layers:
        at = f"encoder.layers.{layer}."
        block = f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{at}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        for ours, theirs in _OPEN_CLIP_LAYER:
            for kind in ("weight", "bias"):
                out[f"{block}{theirs}.{kind}"] = state.pop(f"{at}{ours}.{kind}")
    if state:
        raise ValueError(f"text encoder parameters with no OpenCLIP name: {sorted(state)[:3]}")
    return out


def pipeline_to_original(pipe, family: str) -> dict[str, torch.Tensor]:
    """Every weight of a Stable Diffusion pipeline under the original single-file names."""
    state = unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config))
    state |= vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config))
    if family == "sd2":
        state |= open_clip_to_original(pipe.text_encoder.state_dict(), OPEN_CLIP_PREFIXES["sd2"])
    else:
        state |= clip_to_original(pipe.text_encoder.state_dict(), CLIP_PREFIXES[family])
    if family == "sdxl":
        state |= open_clip_to_original(pipe.text_encoder_2.state_dict(), OPEN_CLIP_PREFIXES["sdxl"])
    return state


def write_single_file(folder: Path, out: Path, family: str) -> Path:
    """Write the pipeline folder ``folder`` as one original-layout .safetensors checkpoint."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    state = {k: v.contiguous() for k, v in pipeline_to_original(pipe, family).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
