"""Single-file checkpoints: the one-file models A1111, Forge, ComfyUI and Civitai use.

An SD checkpoint holds a whole Stable Diffusion pipeline in one .safetensors file, under
the original (LDM/SGM) tensor names; a flow-matching checkpoint (FLUX.1, FLUX.2 Klein,
Qwen-Image, Z-Image) usually holds only the transformer, under its original names, bare or
under ``model.diffusion_model.`` / ``diffusion_model.`` (ComfyUI's repackaged files, BFL's
releases). Everything here reads only the header (no torch), so a producer can say at
registration or submit what the file is, or why it is refused:

- pickled formats (.ckpt, .pt, .pth, .bin) are refused: loading them runs arbitrary code;
- the family is read from the tensors, never the file name: SDXL has a second, OpenCLIP
  text encoder (``conditioner.embedders.1.model.``), SD 2.x one OpenCLIP encoder
  (``cond_stage_model.model.``), SD 1.x OpenAI's CLIP (``cond_stage_model.transformer.``);
  FLUX.2 its shared modulation (``single_stream_modulation.lin``), FLUX.1 BFL's double
  blocks (or diffusers' single blocks) with an input projection whose width and channels
  tell the variant, Qwen-Image ``txt_norm`` and ``img_mlp``, Z-Image its layers'
  ``adaLN_modulation.0`` (the keys diffusers' single-file loader tells them by);
- what lorafleet cannot run is refused by name: an SDXL refiner (only the OpenCLIP
  encoder), an instruct-pix2pix (8 input channels) UNet, FLUX.1 Fill
  (384 input channels) or Depth/Canny (128), Chroma, FLUX.2 [dev], a file with no model
  lorafleet knows at all (a LoRA, a VAE, SD3 ...). FLUX.1 Kontext and Qwen-Image Edit have
  their base model's shapes: they cannot be told apart here.

An inpainting checkpoint (its UNet reads 9 channels: latents, mask, masked image) is a model
whose jobs bring an init image and a mask; its configs are its family's inpainting model's.

The prediction type of an SD 2.x file is not in its tensors; it comes from the file's
ModelSpec metadata (``modelspec.prediction_type``) when present, else from the component
configs the file is loaded with (``--config``, or the family's canonical repository).
A transformer-only file takes its text encoders, VAE and configs from there too. A GGUF
file (``.gguf``: quantized blocks, common/catalog/gguf_files.py) is read the same way and must
hold a flow transformer; bitsandbytes' NF4/FP4 files are refused naming the reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.family_keys import variant_of
from lorafleet.common.catalog.gguf_files import GGUF_ALLOWED, check_gguf_types, is_gguf, read_gguf_header
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
    Family.flux1: "black-forest-labs/FLUX.1-dev",
    Family.zimage: "Tongyi-MAI/Z-Image-Turbo",
    Family.qwenimage: "Qwen/Qwen-Image",
    Family.flux2: "black-forest-labs/FLUX.2-klein-4B",
}
"""Where a checkpoint's component configs come from when neither --config nor
LORAFLEET_CHECKPOINT_CONFIGS names a local folder (needs the hub once, then its cache)."""

VARIANT_CONFIGS = {
    (Family.flux1, "schnell"): "black-forest-labs/FLUX.1-schnell",
    (Family.flux2, "klein-9b"): "black-forest-labs/FLUX.2-klein-9B",
}
"""Canonical configs of the variants whose transformer config differs from the family's
(schnell has no guidance embedding; Klein 9B is 4096 wide): ``CheckpointInfo.canonical_config``."""

INPAINTING_CONFIGS = {
    Family.sd15: "stable-diffusion-v1-5/stable-diffusion-inpainting",
    Family.sd2: "stabilityai/stable-diffusion-2-inpainting",
    Family.sdxl: "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}
"""Canonical configs of inpainting checkpoints (a 9-channel UNet)."""

NATIVE_SIZE = {
    Family.sd15: 512,
    Family.sd2: 768,
    Family.sdxl: 1024,
    **{family: family.traits.size for family in Family if family.is_flow},
}
"""Width and height a family was trained at (SD 2.x base models: 512)."""

FLUX1_IMAGE_CHANNELS = {384: "a FLUX.1 Fill checkpoint", 128: "a FLUX.1 Depth or Canny checkpoint"}
"""FLUX.1 control and fill models by the channels their ``img_in`` reads (txt2img: 64)."""
BNB_QUANT_STATE = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
"""How bitsandbytes names a 4-bit weight's serialized quantization state (Forge's NF4 files)."""
_FLOW_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_IMAGE_IN = ("img_in.weight", "x_embedder.weight")
"""A flow transformer's input projection, original and diffusers' name: (width, channels)."""
_GUIDANCE = (
    "guidance_in.in_layer.weight",
    "time_text_embed.guidance_embedder.linear_1.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight",
)
"""The distilled guidance embedding (FLUX.1 dev and Krea, FLUX.2 dev), original and diffusers' names."""

_TEXT_WIDTH_KEYS = {
    Family.sd15: [("text_encoder", "cond_stage_model.transformer.text_model.final_layer_norm.weight")],
    Family.sd2: [("text_encoder", "cond_stage_model.model.ln_final.weight")],
    Family.sdxl: [
        ("text_encoder", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"),
        ("text_encoder_2", "conditioner.embedders.1.model.ln_final.weight"),
    ],
}
"""Where each family's text encoders show their width in a checkpoint."""
ALLOWED = (
    "an SD 1.x, SD 2.x or SDXL single-file checkpoint, or a FLUX.1, FLUX.2 Klein, Qwen-Image or "
    "Z-Image transformer file"
)
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
    variant: str | None = None
    """FLUX.1: ``dev`` (a guidance embedding: dev, Krea) or ``schnell``; FLUX.2: ``klein-4b``
    or ``klein-9b`` (by width). None where the tensors do not tell (SD, Z-Image, Qwen-Image)."""
    guidance_embeds: bool | None = None
    """Whether the transformer reads a distilled guidance value (``guidance_in``); None for SD."""
    transformer_width: int | None = None
    """The flow transformer's hidden size (what a LoRA's ``transformer_width`` must match)."""
    inpainting: bool = False
    """An inpainting UNet (9 input channels): jobs bring an init image and a mask."""
    dtype: str | None = None
    """The dtype most of its weight matrices are stored in (``F16``, ``BF16``, ``F8_E4M3`` for
    ComfyUI's fp8 files; a GGUF file's GGML type, ``Q8_0``, ``Q4_K`` ...)."""

    @property
    def canonical_config(self) -> str:
        """The repository its component configs come from when nothing else names them."""
        if self.inpainting:
            return INPAINTING_CONFIGS[self.family]
        return VARIANT_CONFIGS.get((self.family, self.variant)) or CANONICAL_CONFIGS[self.family]


def describe_checkpoint(path: Path) -> CheckpointInfo:
    """Check a single-file checkpoint and describe it; FileRefused says why it is refused."""
    if is_gguf(path):
        header = read_gguf_header(path, max_bytes=MAX_CHECKPOINT_BYTES)
    else:
        refuse_pickled(path)
        header = read_safetensors_header(path, max_bytes=MAX_CHECKPOINT_BYTES)
    size, dtype = path.stat().st_size, _main_dtype(header)
    flow = flow_checkpoint(header, path.name)
    if is_gguf(path) and flow is not None:
        check_gguf_types(header, path.name)
    if flow is None and is_gguf(path):
        raise FileRefused(
            "a GGUF file without a FLUX.1, FLUX.2 Klein, Qwen-Image or Z-Image transformer in it",
            field=path.name,
            allowed=GGUF_ALLOWED,
        )
    if flow is not None:
        family, variant, guidance, width = flow
        return CheckpointInfo(
            path=path,
            size=size,
            family=family,
            cross_attention_dim=None,
            prediction_type=None,
            text_widths={},
            variant=variant,
            guidance_embeds=guidance,
            transformer_width=width,
            dtype=dtype,
        )
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
    unet_input = header.tensors[UNET_INPUT].shape
    inpainting = len(unet_input) == 4 and unet_input[1] == 9
    return CheckpointInfo(path, size, family, width, prediction, widths, dtype=dtype, inpainting=inpainting)


def flow_checkpoint(
    header: SafetensorsHeader, name: str
) -> tuple[Family, str | None, bool, int | None] | None:
    """A flow-matching transformer's family, variant, guidance embedding and width, from
    its tensor names (original or diffusers'); None if the file holds none; FileRefused for
    what cannot run."""
    keys = header.tensors
    if "scaled_fp8" in keys or any(k.endswith(".scale_weight") for k in keys):
        raise FileRefused(
            "a ComfyUI 'scaled fp8' checkpoint: its fp8 weights need a per-tensor scale that lorafleet "
            "does not apply",
            field=name,
            allowed="a plain fp8 e4m3fn, bf16 or fp16 checkpoint of the same model",
        )
    if any(k.endswith(BNB_QUANT_STATE) for k in keys):
        raise FileRefused(
            "an NF4/FP4 (bitsandbytes) checkpoint: lorafleet workers do not load bitsandbytes' 4-bit "
            "weights (its kernels are built for CUDA); a GGUF file of the same model runs, with LoRAs "
            "beside its quantized weights",
            field=name,
            allowed="a GGUF (Q8_0, Q4_K ...), fp8 e4m3fn, bf16 or fp16 file of the same model",
        )
    for p in _FLOW_PREFIXES:
        found = _finder(keys, p)
        guidance = found(*_GUIDANCE)
        img_in = next((keys[p + n].shape for n in _IMAGE_IN if p + n in keys), ())
        width = img_in[0] if len(img_in) == 2 else None
        if found("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"):
            variant = variant_of(Family.flux2, width)
            if variant == "dev":
                raise FileRefused(
                    f"a FLUX.2 [dev] checkpoint (width {width}): lorafleet runs FLUX.2 Klein",
                    field=name,
                    allowed="a FLUX.2 Klein 4B or 9B transformer",
                )
            return Family.flux2, variant, guidance, width
        if (
            found("double_blocks.0.img_attn.qkv.weight", "single_transformer_blocks.0.proj_mlp.weight")
            and width
        ):
            if any(k.startswith(p + "distilled_guidance_layer.") for k in keys):
                raise FileRefused("a Chroma checkpoint: lorafleet has no Chroma family", field=name)
            if img_in[1] in FLUX1_IMAGE_CHANNELS:
                raise FileRefused(
                    f"{FLUX1_IMAGE_CHANNELS[img_in[1]]} (its transformer reads {img_in[1]} channels, "
                    "not the 64 of txt2img FLUX.1)",
                    field=name,
                    allowed="a FLUX.1 dev, Krea or schnell transformer",
                )
            return Family.flux1, "dev" if guidance else "schnell", guidance, width
        if found("txt_norm.weight") and found("transformer_blocks.0.img_mlp.net.0.proj.weight"):
            return Family.qwenimage, None, False, width
        modulation = keys.get(p + "layers.0.adaLN_modulation.0.weight")
        if modulation is not None and modulation.shape:
            return Family.zimage, None, False, modulation.shape[0] // 4  # scale and gate, attention and MLP
    return None


def _finder(keys, prefix: str):
    """A test for whether any of some tensor names, under ``prefix``, is in ``keys``."""
    return lambda *names: any(prefix + n in keys for n in names)


def _main_dtype(header: SafetensorsHeader) -> str | None:
    counts = Counter(t.dtype for t in header.tensors.values() if len(t.shape) >= 2)
    return counts.most_common(1)[0][0] if counts else None


def checkpoint_family(header: SafetensorsHeader, name: str) -> Family:
    """The family of a checkpoint from its tensor names; FileRefused for what cannot run."""
    keys = header.tensors
    unet_input = keys.get(UNET_INPUT)
    if unet_input is None:
        kind = "a LoRA (import it with `lorafleet loras import`)" if _looks_like_lora(keys) else None
        raise FileRefused(
            "not a Stable Diffusion checkpoint: it has no UNet under model.diffusion_model., nor a "
            "FLUX.1, FLUX.2 Klein, Qwen-Image or Z-Image transformer"
            + (f"; it looks like {kind}" if kind else ""),
            field=name,
            allowed=ALLOWED,
        )
    channels = unet_input.shape[1] if len(unet_input.shape) == 4 else None
    if channels == 8:
        raise FileRefused("an instruct-pix2pix checkpoint (its UNet reads 8 channels)", field=name)
    if channels not in (4, 9):
        raise FileRefused(
            f"its UNet reads {channels} channels, not the 4 of a txt2img model or the 9 of an inpainting one",
            field=name,
        )
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
        allowed=ALLOWED,
    )


def _looks_like_lora(keys) -> bool:
    return any(".lora_down." in k or ".lora_A." in k or ".hada_w1_a" in k for k in keys)


def short_hash(path: Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return sha256_file(path)[:10]
