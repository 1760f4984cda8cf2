"""The SD side of bench/lora_switch.py: the UNet, its kohya LoRA files, diffusers' calls.

An SD1.5-shaped UNet (the real config, random weights) or SDXL's, or the tests' tiny UNet of
that family; two "style" LoRAs of rank 32 over attention, feed-forward and proj layers and
one LCM-LoRA-shaped file of rank 64 that also covers the ResNet convolutions, all kohya.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SD15 = dict(sample_size=64, cross_attention_dim=768)
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
STYLE_LAYERS = (
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".proj_in",
    ".proj_out",
)
LCM_LAYERS = STYLE_LAYERS + (".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut")


def build_unet(family: str, shape: str, device: torch.device, dtype: torch.dtype):
    """The family's UNet in its real shapes, or the tiny one of lorafleet.worker.tiny."""
    from diffusers import UNet2DConditionModel

    if shape == "tiny":
        from lorafleet.worker.tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as scratch:
            folder = make_tiny_model(Path(scratch) / "tiny", family=family)
            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(SDXL if family == "sdxl" else SD15))
    return unet.to(device=device, dtype=dtype).eval()


def write_lora(unet, path: Path, layers, rank: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or not name.endswith(layers):
            continue
        out, rest = weight.shape[0], weight[0].numel()
        r = min(rank, out, rest)
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(r, rest, generator=gen) / rest**0.5
        up = torch.randn(out, r, generator=gen) * 0.01
        if weight.dim() == 4:
            down, up = down.reshape(r, *weight.shape[1:]), up.reshape(out, r, 1, 1)
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = up.half()
        state[f"{key}.alpha"] = torch.tensor(float(r)).half()
    save_file(state, str(path))
    return len(state) // 3


def diffusers_calls(unet, files, device, dtype):
    """(load_fuse(name, weight), unfuse_unload()) through a pipeline around ``unet``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorafleet.worker.tiny import make_tiny_model

    xl = "add_embedding" in dict(unet.named_modules())
    with tempfile.TemporaryDirectory() as scratch:
        tiny_dir = make_tiny_model(Path(scratch) / "tiny", family="sdxl" if xl else "sd15")
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        tiny = cls.from_pretrained(str(tiny_dir), **extra)
    components = {k: v for k, v in tiny.components.items() if k != "unet"}
    pipe = cls(**components, unet=unet, **({"add_watermarker": False} if xl else {})).to(device)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype)

    def load_fuse(a: str, wa: float):
        pipe.load_lora_weights(str(files[a]), adapter_name=a)
        pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
        pipe.set_adapters([a, "lcm"], [wa, 0.35])
        pipe.fuse_lora(adapter_names=[a, "lcm"], lora_scale=1.0)

    def unfuse_unload():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    return load_fuse, unfuse_unload
