"""Tiny offline pipelines of the flow-matching families: FLUX.1 (dev and schnell), Z-Image,
Qwen-Image and FLUX.2 Klein. Nothing is downloaded.

``make_tiny_flow_model`` writes a real diffusers pipeline folder with random weights in each
family's layout (its pipeline class, component classes and scheduler config), small enough
that a 64x64 image in 2 steps takes well under a second on a CPU. The weights are the same
for the same seed. Each VAE downsamples 8x, as the real ones do, so sizes divisible by 16 work.

Per family (the real model's value in parentheses where the tiny one differs in more than size):

- ``flux1`` / ``flux1-schnell``: ``FluxTransformer2DModel`` 2 double + 2 single blocks, 2 heads
  of 16, ``guidance_embeds`` True for dev and False for schnell; CLIP 32 wide and T5 32 wide;
  ``AutoencoderKL`` with 1 latent channel (16), packed 2x2 into the transformer's 4 inputs.
- ``zimage``: ``ZImageTransformer2DModel`` dim 32, 2 layers + 1 refiner, 2 heads; ``Qwen3Model``
  16 wide, 2 layers (its second-last hidden state is the caption); ``AutoencoderKL`` with 16 latent channels; Z-Image-Turbo's scheduler.
- ``qwenimage``: ``QwenImageTransformer2DModel`` 2 blocks, 3 heads of 16; a 16-wide
  ``Qwen2_5_VLForConditionalGeneration`` (1-block vision tower); ``AutoencoderKLQwenImage``
  base 24, one width at every level, 4 latent channels (16) with mean 0 and std 1.
- ``flux2``: ``Flux2Transformer2DModel`` 2 double + 2 single blocks, no guidance embedding (Klein);
  ``Qwen3ForCausalLM`` 16 wide and 28 layers deep, so the pipeline's default
  ``text_encoder_out_layers`` (9, 18, 27) read real layers and the transformer's context is
  3 x 16 = 48 wide, as Klein's is 3 x the text encoder's width; ``AutoencoderKLFlux2`` with 4
  latent channels (32), patchified 2x2 into the transformer's 16 inputs; ``is_distilled`` False.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lorafleet.worker.tiny_text import (
    clip_text_encoder,
    qwen_token_ids,
    qwen_tokenizer,
    t5_text_encoder,
    write_clip_tokenizer,
)

FLOW_FAMILIES = ("flux1", "flux1-schnell", "zimage", "qwenimage", "flux2")
"""What ``make_tiny_flow_model`` builds; ``flux1`` is dev-shaped (guidance embedding), ``flux1-schnell`` not."""

FLUX1_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1 dev's scheduler_config.json: the shift follows the image's token count."""

FLUX1_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
"""FLUX.1 schnell's scheduler_config.json: no shift (it is distilled to 1-4 steps)."""

ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""Z-Image-Turbo's scheduler_config.json: a fixed shift of 3 (ZImagePipeline passes mu too,
which only a dynamic-shifting config reads)."""

QWENIMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
"""Qwen-Image's scheduler_config.json."""

FLUX2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
"""FLUX.2's scheduler_config.json (Flux2KleinPipeline computes mu itself from the token count
and the step count, so only ``use_dynamic_shifting`` and the shift type matter)."""

_FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
"""FLUX.1's VAE latent normalisation (Z-Image uses FLUX.1's VAE, so its too)."""

_KLEIN_TEXT_LAYERS = (9, 18, 27)
"""Flux2KleinPipeline's default ``text_encoder_out_layers``: the hidden states it stacks."""


def _flux_vae(latent_channels: int):
    """An 8x AutoencoderKL laid out as FLUX.1's (no quant convs, its scale and shift)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_FLUX_VAE_SCALING,
    )


def _flux1(scratch: Path, *, guidance: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    vocab_size = write_clip_tokenizer(scratch / "clip-tokenizer")
    text_encoder, tokenizer = clip_text_encoder(vocab_size, scratch / "clip-tokenizer", width=32)
    text_encoder_2, tokenizer_2 = t5_text_encoder(width=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # FluxPipeline packs 2x2 patches of the VAE's 1 latent channel
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's width
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance,
    )
    schedule = FLUX1_SCHEDULER if guidance else FLUX1_SCHNELL_SCHEDULER
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**schedule),
        vae=_flux_vae(latent_channels=1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _qwen3_config(tokenizer, *, layers: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=40960,  # Qwen3's
        tie_word_embeddings=True,
        **qwen_token_ids(tokenizer),
    )


def _zimage():
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, layers=2))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,  # the Qwen3 text encoder's width
        axes_dims=[8, 4, 4],
    )
    with torch.no_grad():  # learned pad embeddings: some diffusers versions leave them torch.empty
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
        vae=_flux_vae(latent_channels=16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _qwenimage():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = qwen_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 128000,  # Qwen2.5-VL's
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            **ids,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
            "fullatt_block_indexes": [0],
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        **ids,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 2x2 packed patches of the VAE's 4 latent channels
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,  # the Qwen2.5-VL text model's width
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _flux2():
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, layers=max(_KLEIN_TEXT_LAYERS) + 1))
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 2x2 patches of the VAE's 4 latent channels
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(_KLEIN_TEXT_LAYERS) * 16,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,  # Klein has no guidance embedding
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def make_tiny_flow_model(folder: Path, family: str, seed: int = 0) -> Path:
    """Write a tiny pipeline of the flow-matching ``family`` (one of ``FLOW_FAMILIES``) into
    ``folder``; return it. The same seed writes the same weights."""
    if family not in FLOW_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FLOW_FAMILIES)}, got {family!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        if family in ("flux1", "flux1-schnell"):
            pipe = _flux1(Path(scratch), guidance=family == "flux1")
        elif family == "zimage":
            pipe = _zimage()
        elif family == "qwenimage":
            pipe = _qwenimage()
        else:
            pipe = _flux2()
        pipe.save_pretrained(str(folder))
    return folder


def make_tiny_flux_controlnet(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 ControlNet (a diffusers ``FluxControlNetModel`` folder) for the tiny
    FLUX.1 pipeline ``model_dir``; return ``out_dir``.

    Built as diffusers builds one from a FLUX transformer (``from_transformer``: its embedders
    and first double block copied, 1 double block, no single block); its output projections
    (``controlnet_blocks``) and map embedder, zero at first as in training, get small seeded
    weights so that the map changes the image."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(str(Path(model_dir) / "transformer"))
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=0, attention_head_dim=head_dim, num_attention_heads=heads
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, tensor in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks.", "controlnet_x_embedder.")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    controlnet.save_pretrained(str(out_dir))
    return Path(out_dir)
