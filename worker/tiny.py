"""Offline tiny pipelines and demo LoRAs, for tests and the demo. Nothing is downloaded.

``make_tiny_model`` writes a real diffusers pipeline folder (SD1.5-, SD2- or SDXL-shaped here,
the flow-matching families in ``tiny_flow``; random weights, self-made tokenizers from
``tiny_text``) that ``from_pretrained`` loads offline; a 64x64 image takes a fraction of a
second on a CPU. ``make_demo_loras`` writes LoRA files for any such folder (tiny or real) in
the formats people bring: kohya LoRA and LoCon, diffusers/PEFT, and one shaped like an
LCM-LoRA. Both are deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.common.catalog.models import describe_folder
from lorafleet.common.schema.family import Family
from lorafleet.worker.lora.module_index import file_module_names
from lorafleet.worker.pipelines import empty_components
from lorafleet.worker.tiny_flow import FLOW_FAMILIES, make_tiny_flow_model
from lorafleet.worker.tiny_text import clip_text_encoder, write_clip_tokenizer

TINY_SIZE = 64
"""Native image size of the tiny models (UNet sample size 8, VAE downscale 8)."""

TINY_FAMILIES = ("sd15", "sd15-inpainting", "sd2", "sdxl", *FLOW_FAMILIES)
"""What ``make_tiny_model`` builds (``flux1`` is FLUX.1 dev-shaped, ``flux1-schnell`` schnell-shaped)."""


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_SIZE,
        scaling_factor=scaling_factor,
    )


def make_tiny_model(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny pipeline of ``family`` (one of ``TINY_FAMILIES``) into ``folder``; return it.

    ``sd15-inpainting`` is the tiny SD 1.5 as an inpainting model (its UNet reads 9 channels:
    latents, mask, masked image). The tiny SD 2.x has an OpenCLIP-like text encoder (gelu, 48 wide) and predicts v, as
    the 768 px SD 2.x models do; the tiny SDXL's second encoder is 48 wide beside the
    first's 32, so its UNet reads a text embedding 80 wide.
    """
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, got {family!r}")
    if family in FLOW_FAMILIES:
        return make_tiny_flow_model(folder, family, seed)
    folder = Path(folder)
    torch.manual_seed(seed)
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        vocab_size = write_clip_tokenizer(scratch_dir / "tok")
        if family in ("sd15", "sd15-inpainting", "sd2"):
            width = 32 if family != "sd2" else 48
            activation = "quick_gelu" if family != "sd2" else "gelu"
            text_encoder, tokenizer = clip_text_encoder(
                vocab_size, scratch_dir / "tok", width=width, activation=activation
            )
            prediction = "epsilon" if family != "sd2" else "v_prediction"
            unet = UNet2DConditionModel(
                sample_size=TINY_SIZE // 8,
                in_channels=9 if family == "sd15-inpainting" else 4,  # latents, mask, masked image
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=width,
                attention_head_dim=8,
                norm_num_groups=32,
            )
            kind = StableDiffusionInpaintPipeline if family == "sd15-inpainting" else StableDiffusionPipeline
            pipe = kind(
                vae=_vae(0.18215),
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=PNDMScheduler(**schedule, skip_prk_steps=True, prediction_type=prediction),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            text_encoder, tokenizer = clip_text_encoder(vocab_size, scratch_dir / "tok")
            text_encoder_2, tokenizer_2 = clip_text_encoder(
                vocab_size, scratch_dir / "tok", projection=True, width=48, activation="gelu"
            )
            unet = UNet2DConditionModel(
                sample_size=TINY_SIZE // 8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=32 + 48,
                norm_num_groups=32,
            )
            pipe = StableDiffusionXLPipeline(
                vae=_vae(0.13025),
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=unet,
                scheduler=EulerDiscreteScheduler(**schedule, timestep_spacing="leading"),
                add_watermarker=False,
            )
        pipe.save_pretrained(str(folder))
    return folder


def make_sd15_shaped_model(folder: Path, seed: int = 0) -> Path:
    """Random weights in SD 1.5's real shapes (an 860M-parameter UNet, the 84M VAE, a
    123M CLIP text encoder), for benchmarks that need real sizes; nothing is downloaded."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = write_clip_tokenizer(Path(scratch) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(scratch) / "tok"))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768
        )  # diffusers' defaults are SD 1.x's
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        schedule = {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
        }
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(**schedule, skip_prk_steps=True),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(str(folder))
    return folder


# ---------------------------------------------------------------------------- demo LoRAs


@dataclass(frozen=True)
class DemoLora:
    name: str
    format: str
    description: str


DEMO_LORAS = (
    DemoLora("watercolor", "kohya", "kohya LoRA on attention and the text encoder, trigger word"),
    DemoLora("ink-sketch", "peft", "diffusers/PEFT LoRA on attention and feed-forward layers"),
    DemoLora("texture-locon", "locon", "kohya LoCon: attention plus the UNet's 3x3 convolutions"),
    DemoLora("lcm-lora-{family}", "lcm", "shaped like an LCM-LoRA: rank 64 over attention, ff, proj layers"),
)


def _layers(components, component: str, wanted) -> list[tuple[str, tuple[int, ...]]]:
    """(name as LoRA files write it, weight shape) of the layers ``wanted`` picks."""
    found = []
    for name, module in components[component].named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() in (2, 4) and wanted(name, weight):
            found.append((file_module_names(component, name)[0], tuple(weight.shape)))
    return found


def _attention(name: str, weight) -> bool:
    return any(name.endswith(s) for s in (".to_q", ".to_k", ".to_v", ".to_out.0"))


def _text_attention(name: str, weight) -> bool:
    return any(name.endswith(s) for s in (".q_proj", ".k_proj", ".v_proj", ".out_proj"))


def _attention_ff(name: str, weight) -> bool:
    return _attention(name, weight) or name.endswith((".ff.net.0.proj", ".ff.net.2"))


def _conv3x3(name: str, weight) -> bool:
    return weight.dim() == 4 and weight.shape[-1] == 3 and ".resnets." in name


def _lcm_layers(name: str, weight) -> bool:
    return _attention_ff(name, weight) or name.endswith((".proj_in", ".proj_out"))


def _factors(shape: tuple[int, ...], rank: int, generator: torch.Generator, strength: float):
    """(down, up) factors of a random delta whose entries have std about ``strength``."""
    out_features = shape[0]
    in_flat = math.prod(shape[1:])
    rank = max(1, min(rank, out_features, in_flat))
    down = torch.randn(rank, in_flat, generator=generator) / in_flat**0.5
    up = torch.randn(out_features, rank, generator=generator) * strength / rank**0.5
    if len(shape) == 4:
        down = down.reshape(rank, shape[1], shape[2], shape[3])
        up = up.reshape(out_features, rank, 1, 1)
    return down, up, rank


def _kohya_state(layers, prefix: str, rank: int, alpha_ratio: float, gen, strength: float):
    state = {}
    for name, shape in layers:
        down, up, r = _factors(shape, rank, gen, strength / alpha_ratio)
        base = prefix + name.replace(".", "_")
        state[f"{base}.lora_down.weight"] = down.half()
        state[f"{base}.lora_up.weight"] = up.half()
        state[f"{base}.alpha"] = torch.tensor(float(r) * alpha_ratio).half()
    return state


def _peft_state(layers, prefix: str, rank: int, gen, strength: float):
    state = {}
    for name, shape in layers:
        down, up, _ = _factors(shape, rank, gen, strength)
        state[f"{prefix}{name}.lora_A.weight"] = down
        state[f"{prefix}{name}.lora_B.weight"] = up
    return state


def make_demo_loras(model_dir: Path, out_dir: Path, seed: int = 0, strength: float = 0.05) -> list[Path]:
    """Write the DEMO_LORAS for the pipeline in ``model_dir`` into ``out_dir``."""
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = describe_folder(model_dir.name, model_dir)
    family = model.family or Family.sd15
    components = empty_components(model_dir, family)
    if family.is_flow:
        from lorafleet.worker.demo_flow_loras import make_flow_demo_loras

        return make_flow_demo_loras(components, family, out_dir, seed, strength)
    te_prefix = "lora_te1_" if family is Family.sdxl else "lora_te_"
    version = "sdxl_base_v1-0" if family is Family.sdxl else "sd_v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    written = []
    for demo in DEMO_LORAS:
        metadata = {"ss_base_model_version": version, "lorafleet.demo": demo.description}
        if demo.format == "kohya":
            state = _kohya_state(_layers(components, "unet", _attention), "lora_unet_", 4, 0.5, gen, strength)
            state |= _kohya_state(
                _layers(components, "text_encoder", _text_attention), te_prefix, 4, 0.5, gen, strength
            )
            if "text_encoder_2" in components:
                te2 = _layers(components, "text_encoder_2", _text_attention)
                state |= _kohya_state(te2, "lora_te2_", 4, 0.5, gen, strength)
            metadata |= {
                "ss_network_module": "networks.lora",
                "ss_network_dim": "4",
                "ss_network_alpha": "2",
                "modelspec.trigger_phrase": "watercolor",
            }
        elif demo.format == "peft":
            state = _peft_state(_layers(components, "unet", _attention_ff), "unet.", 8, gen, strength)
            metadata = {}  # diffusers' own exports carry no kohya metadata: shapes tell the family
        elif demo.format == "locon":
            layers = _layers(components, "unet", lambda n, w: _attention(n, w) or _conv3x3(n, w))
            state = _kohya_state(layers, "lora_unet_", 4, 1.0, gen, strength)
            metadata |= {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'}
        else:
            state = _kohya_state(
                _layers(components, "unet", _lcm_layers), "lora_unet_", 64, 1.0, gen, strength
            )
            metadata |= {"lorafleet.lcm": "true"}
        path = out_dir / f"{demo.name.format(family=family)}.safetensors"
        save_file(state, str(path), metadata=metadata)
        written.append(path)
    return written


def make_tiny_controlnet(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A ControlNet for the tiny SD pipeline in ``model_dir``, written as a diffusers folder.

    Built from the model's UNet as ControlNet training starts (diffusers' ``from_unet``); its
    zero convolutions, zero when training starts, get small seeded weights so that the control
    map changes the image. The hint encoder downsamples by the VAE's factor.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    vae_levels = len(json.loads((model_dir / "vae" / "config.json").read_text())["block_out_channels"])
    hint = tuple(16 * 2**n for n in range(vae_levels))  # one block per halving of the VAE, plus one
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
        controlnet.controlnet_cond_embedding.conv_out,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
    controlnet.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_t2i_adapter(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A T2I-Adapter for the tiny SD pipeline in ``model_dir``, written as a diffusers folder:
    one block per UNet block of its width (diffusers' ``full_adapter``, unshuffling by the VAE's
    8; on SDXL its ``full_adapter_xl``, by 16, as SDXL's first block adds its map after halving),
    with seeded random weights, so that the control image changes the picture."""
    from diffusers import T2IAdapter

    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    xl = describe_folder(model_dir.name, model_dir).family is Family.sdxl
    adapter = T2IAdapter(
        channels=list(unet["block_out_channels"]),
        num_res_blocks=1,
        downscale_factor=16 if xl else 8,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in adapter.parameters():  # He's scale (a bias as if it had 16 inputs)
            fan_in = weight[0].numel() if weight.dim() > 1 else 16
            weight.copy_(torch.randn(weight.shape, generator=generator) * math.sqrt(2 / fan_in))
    adapter.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_ip_adapter(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """An IP-Adapter for the tiny SD pipeline in ``model_dir``, laid out as h94/IP-Adapter's
    ``models/``: ``ip-adapter.safetensors`` (image projection to 4 tokens, image key/value
    projections for every cross-attention in diffusers' order) beside a tiny CLIP image
    encoder (224 px, as diffusers' default image processor crops)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    cross, embed, tokens = unet.config.cross_attention_dim, 32, 4
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.1

    state = {
        "image_proj.proj.weight": rand(cross * tokens, embed),
        "image_proj.proj.bias": rand(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1  # diffusers numbers the adapter's layers 1, 3, 5 ... over the cross-attentions
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "ip-adapter.safetensors"))
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
            projection_dim=embed,
        )
    )
    encoder.save_pretrained(str(out_dir / "image_encoder"))
    return out_dir


UPSCALER_LAYOUTS = ("basicsr", "esrgan", "esrgan-old")
"""Key layouts ``make_tiny_upscaler`` writes (common/catalog/upscalers.py reads all three)."""


def make_tiny_upscaler(path: Path, *, scale: int = 4, layout: str = "basicsr", seed: int = 0) -> Path:
    """A tiny ESRGAN-family upscaler (RRDB net, 8 features, 2 blocks) as a .safetensors file in
    one of the layouts people's files use; seeded small weights, so it sharpens a little."""
    from safetensors.torch import save_file

    from lorafleet.worker.upscalers import RRDBNet

    if layout not in UPSCALER_LAYOUTS or scale not in (1, 2, 4):
        raise ValueError(f"layout one of {', '.join(UPSCALER_LAYOUTS)}, scale 1, 2 or 4")
    unshuffle = {4: 1, 2: 2, 1: 4}[scale]
    torch.manual_seed(seed)
    model = RRDBNet(channels=3, features=8, growth=4, blocks=2, ups=2, unshuffle=unshuffle)
    state = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    if layout != "basicsr" and unshuffle != 1:
        raise ValueError("ESRGAN's own layouts are 4x (2x and 1x models are Real-ESRGAN's)")
    state = {_esrgan_name(k, layout, blocks=2): v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _esrgan_name(name: str, layout: str, *, blocks: int) -> str:
    """RRDBNet's parameter name in BasicSR's layout, or ESRGAN's newer or original one."""
    part, _, kind = name.rpartition(".")
    if layout == "basicsr":
        return f"conv_up{int(part[4:]) + 1}.{kind}" if part.startswith("ups.") else name
    pieces = part.split(".")
    if pieces[0] == "body":  # body.N.rdbR.convC
        n, rdb, conv = pieces[1], pieces[2][3:], pieces[3]
        if layout == "esrgan":
            return f"RRDB_trunk.{n}.RDB{rdb}.{conv}.{kind}"
        return f"model.1.sub.{n}.RDB{rdb}.{conv}.0.{kind}"
    if layout == "esrgan":
        new = {"conv_body": "trunk_conv", "conv_hr": "HRconv", "ups.0": "upconv1", "ups.1": "upconv2"}
        return f"{new.get(part, part)}.{kind}"
    old = {
        "conv_first": "model.0",
        "conv_body": f"model.1.sub.{blocks}",
        "ups.0": "model.3",
        "ups.1": "model.6",
    }
    old |= {"conv_hr": "model.8", "conv_last": "model.10"}
    return f"{old[part]}.{kind}"
