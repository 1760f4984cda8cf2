"""Single-file checkpoints: the one-file models A1111, Forge, ComfyUI and Civitai use.

A checkpoint holds a whole Stable Diffusion pipeline in one .safetensors file, under the
original (LDM/SGM) tensor names. Everything here reads only its header (no torch), so a
producer can say at registration or submit what the file is, or why it is refused:

- pickled formats (.ckpt, .pt, .pth, .bin) are refused: loading them runs arbitrary code;
- the family is read from the tensors, never the file name: SDXL has a second, OpenCLIP
  text encoder (``conditioner.embedders.1.model.``), SD 2.x one OpenCLIP encoder
  (``cond_stage_model.model.``), SD 1.x OpenAI's CLIP (``cond_stage_model.transformer.``);
- what lorafleet cannot run is refused by name: an SDXL refiner (only the OpenCLIP
  encoder), an inpainting (9 input channels) or instruct-pix2pix (8) UNet, a file with no
  Stable Diffusion UNet at all (a LoRA, a VAE, SD3, Flux ...).

The prediction type of an SD 2.x file is not in its tensors; it comes from the file's
ModelSpec metadata (``modelspec.prediction_type``) when present, else from the component
configs the file is loaded with (``--config``, or the family's canonical repository).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.lora_files import (
    SafetensorsHeader,
    read_safetensors_header,
    refuse_pickled,
    sha256_file,
)
from lorafleet.common.schema.errors import FileRefused
from lorafleet.common.schema.family import Family

MAX_CHECKPOINT_BYTES = 32 * 1024**3
"""Largest checkpoint accepted (an fp32 SDXL checkpoint is about 14 GB)."""
UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
"""The UNet's first convolution: its input channels tell txt2img (4) from inpainting (9)."""

CANONICAL_CONFIGS = {
    Family.sd15: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    Family.sd2: "stabilityai/stable-diffusion-2-1",
    Family.sdxl: "stabilityai/stable-diffusion-xl-base-1.0",
}
"""Where a checkpoint's component configs come from when neither --config nor
LORAFLEET_CHECKPOINT_CONFIGS names a local folder (needs the hub once, then its cache)."""

NATIVE_SIZE = {Family.sd15: 512, Family.sd2: 768, Family.sdxl: 1024}
"""Width and height a family was trained at (SD 2.x base models: 512)."""

_TEXT_WIDTH_KEYS = {
    Family.sd15: [("text_encoder", "cond_stage_model.transformer.text_model.final_layer_norm.weight")],
    Family.sd2: [("text_encoder", "cond_stage_model.model.ln_final.weight")],
    Family.sdxl: [
        ("text_encoder", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"),
        ("text_encoder_2", "conditioner.embedders.1.model.ln_final.weight"),
    ],
}
"""Where each family's text encoders show their width in a checkpoint."""
_PREDICTION = {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon", "eps": "epsilon"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's header says."""

    path: Path
    size: int
    family: Family
    cross_attention_dim: int | None
    prediction_type: str | None
    text_widths: dict[str, int]
    """Width of each text encoder's token vectors (what an embedding must match)."""


def describe_checkpoint(path: Path) -> CheckpointInfo:
    """Check a single-file checkpoint and describe it; FileRefused says why it is refused."""
    refuse_pickled(path)
    header = read_safetensors_header(path, max_bytes=MAX_CHECKPOINT_BYTES)
    family = checkpoint_family(header, path.name)
    width = next(
        (
            t.shape[1]
            for k, t in header.tensors.items()
            if k.endswith("attn2.to_k.weight") and len(t.shape) == 2
        ),
        None,
    )
    prediction = _PREDICTION.get(header.metadata.get("modelspec.prediction_type", "").lower())
    widths = {}
    for encoder, key in _TEXT_WIDTH_KEYS[family]:
        if key in header.tensors and header.tensors[key].shape:
            widths[encoder] = header.tensors[key].shape[-1]
    return CheckpointInfo(path, path.stat().st_size, family, width, prediction, widths)


def checkpoint_family(header: SafetensorsHeader, name: str) -> Family:
    """The family of a checkpoint from its tensor names; FileRefused for what cannot run."""
    keys = header.tensors
    unet_input = keys.get(UNET_INPUT)
    if unet_input is None:
        kind = "a LoRA (import it with `lorafleet loras import`)" if _looks_like_lora(keys) else None
        raise FileRefused(
            "not a Stable Diffusion checkpoint: it has no UNet under model.diffusion_model."
            + (f"; it looks like {kind}" if kind else ""),
            field=name,
            allowed="an SD 1.x, SD 2.x or SDXL single-file checkpoint",
        )
    channels = unet_input.shape[1] if len(unet_input.shape) == 4 else None
    if channels == 9:
        raise FileRefused(
            "an inpainting checkpoint (its UNet reads 9 channels): lorafleet runs txt2img models", field=name
        )
    if channels == 8:
        raise FileRefused("an instruct-pix2pix checkpoint (its UNet reads 8 channels)", field=name)
    if channels != 4:
        raise FileRefused(f"its UNet reads {channels} channels, not the 4 of a txt2img model", field=name)
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return Family.sdxl
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise FileRefused(
            "an SDXL refiner (it has only the OpenCLIP text encoder): lorafleet runs base models", field=name
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return Family.sd2
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return Family.sd15
    raise FileRefused(
        "an architecture lorafleet does not know: a UNet but no SD 1.x, SD 2.x or SDXL text encoder",
        field=name,
        allowed="an SD 1.x, SD 2.x or SDXL single-file checkpoint",
    )


def _looks_like_lora(keys) -> bool:
    return any(".lora_down." in k or ".lora_A." in k or ".hada_w1_a" in k for k in keys)


def short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return sha256_file(path)[:10]
