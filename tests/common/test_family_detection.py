"""FLUX.1, FLUX.2 Klein, Qwen-Image and Z-Image told from safetensors headers alone: LoRAs in
every naming their trainers write, and transformer-only checkpoints, by tensor names and
the real models' full-size shapes (the files are sparse: only their headers take disk)."""

from __future__ import annotations

import json
import math
import struct

import pytest

from lorafleet.common.catalog.checkpoints import describe_checkpoint
from lorafleet.common.catalog.lora_files import (
    DTYPE_BYTES,
    describe_file,
    detect_family,
    read_safetensors_header,
    transformer_width,
)
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import FileRefused
from lorafleet.common.schema.family import Family

D = 3072
"""FLUX.1, Qwen-Image and FLUX.2 Klein 4B width (24 heads x 128)."""
K9 = 4096
"""FLUX.2 Klein 9B width (32 heads x 128)."""
Z = 3840
"""Z-Image width; its feed-forward is int(Z / 3 * 8) = 10240 wide."""
ZF = 10240


def write_safetensors(path, shapes: dict[str, tuple[int, ...]], metadata=None, dtype: str = "BF16") -> None:
    """A valid safetensors file with these tensors; the data is zeros left as a hole in the
    file, so a full-size checkpoint header costs no disk."""
    table, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * DTYPE_BYTES[dtype]
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        table["__metadata__"] = metadata
    raw = json.dumps(table).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


FACTORS = {
    "peft": ("lora_A.weight", "lora_B.weight"),
    "adapter": ("lora_A.default.weight", "lora_B.default.weight"),  # PEFT's own save
    "kohya": ("lora_down.weight", "lora_up.weight"),
    "xlabs": ("down.weight", "up.weight"),
}


def lora(
    modules: dict[str, tuple[int, int]], style: str = "peft", rank: int = 1
) -> dict[str, tuple[int, ...]]:
    """Factor shapes for modules given as name -> (in, out), in one trainer's key style."""
    shapes: dict[str, tuple[int, ...]] = {}
    for m, (d_in, d_out) in modules.items():
        if style in FACTORS:
            down, up = FACTORS[style]
            shapes |= {f"{m}.{down}": (rank, d_in), f"{m}.{up}": (d_out, rank)}
            shapes |= {f"{m}.alpha": ()} if style == "kohya" else {}
        elif style == "lokr":  # kron(w1 (4, 4), w2_a @ w2_b (out / 4, in / 4))
            shapes |= {f"{m}.lokr_w1": (4, 4), f"{m}.lokr_w2_a": (d_out // 4, rank)}
            shapes |= {f"{m}.lokr_w2_b": (rank, d_in // 4)}
        elif style == "loha":
            for n in "12":
                shapes |= {f"{m}.hada_w{n}_a": (d_out, rank), f"{m}.hada_w{n}_b": (rank, d_in)}
        else:
            raise ValueError(style)
    return shapes


def blocks(pattern: str, last: int, d_in: int, d_out: int) -> dict[str, tuple[int, int]]:
    """The first and the last block of a kind (the highest index is what the geometry checks)."""
    return {pattern.format(n=n): (d_in, d_out) for n in (0, last)}


def described(tmp_path, shapes, metadata=None, name="wild.safetensors"):
    path = tmp_path / name
    write_safetensors(path, shapes, metadata)
    return describe_file(path)


CLIP_L = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}

WILD: dict[str, tuple[dict[str, tuple[int, int]], Family, str]] = {
    "flux1-peft": (
        blocks("transformer.transformer_blocks.{n}.attn.to_q", 18, D, D)
        | blocks("transformer.transformer_blocks.{n}.ff.net.0.proj", 18, D, 4 * D)
        | blocks("transformer.single_transformer_blocks.{n}.attn.to_q", 37, D, D)
        | blocks("transformer.single_transformer_blocks.{n}.proj_out", 37, 5 * D, D),
        Family.flux1,
        "peft",
    ),
    "flux1-kohya-with-clip": (
        blocks("lora_unet_double_blocks_{n}_img_attn_qkv", 18, D, 3 * D)
        | blocks("lora_unet_double_blocks_{n}_txt_mod_lin", 18, D, 6 * D)
        | blocks("lora_unet_single_blocks_{n}_linear1", 37, D, 7 * D)
        | blocks("lora_unet_single_blocks_{n}_linear2", 37, 5 * D, D)
        | CLIP_L,
        Family.flux1,
        "kohya-lora",
    ),
    "flux1-ai-toolkit-bfl": (
        blocks("diffusion_model.double_blocks.{n}.img_attn.qkv", 18, D, 3 * D)
        | blocks("diffusion_model.double_blocks.{n}.img_mlp.0", 18, D, 4 * D)
        | blocks("diffusion_model.single_blocks.{n}.linear1", 37, D, 7 * D),
        Family.flux1,
        "bfl-lora",
    ),
    "flux1-onetrainer": (
        blocks("lora_transformer_transformer_blocks_{n}_attn_to_q", 18, D, D)
        | blocks("lora_transformer_single_transformer_blocks_{n}_proj_mlp", 37, D, 4 * D),
        Family.flux1,
        "onetrainer",
    ),
    "flux1-xlabs": (
        blocks("double_blocks.{n}.processor.qkv_lora1", 18, D, 3 * D)
        | blocks("double_blocks.{n}.processor.proj_lora2", 18, D, D),
        Family.flux1,
        "xlabs",
    ),
    "flux1-lycoris-lokr": (
        blocks("lycoris_transformer_blocks_{n}_attn_to_q", 18, D, D)
        | blocks("lycoris_single_transformer_blocks_{n}_attn_to_q", 37, D, D),
        Family.flux1,
        "lycoris-lokr",
    ),
    "flux1-kohya-lokr": (
        blocks("lora_unet_single_blocks_{n}_linear1", 37, D, 7 * D),
        Family.flux1,
        "lycoris-lokr",
    ),
    "flux1-kohya-loha": (
        blocks("lora_unet_double_blocks_{n}_img_attn_proj", 18, D, D)
        | blocks("lora_unet_single_blocks_{n}_linear2", 37, 5 * D, D),
        Family.flux1,
        "lycoris-loha",
    ),
    "zimage-peft": (
        blocks("transformer.layers.{n}.attention.to_q", 29, Z, Z)
        | blocks("transformer.layers.{n}.feed_forward.w1", 29, Z, ZF)
        | blocks("transformer.layers.{n}.feed_forward.w2", 29, ZF, Z),
        Family.zimage,
        "peft",
    ),
    "zimage-comfy-fused-qkv": (
        blocks("diffusion_model.layers.{n}.attention.qkv", 29, Z, 3 * Z)
        | blocks("diffusion_model.layers.{n}.attention.out", 29, Z, Z),
        Family.zimage,
        "comfy-lora",
    ),
    "zimage-musubi": (
        blocks("lora_unet_layers_{n}_attention_to_q", 29, Z, Z)
        | blocks("lora_unet_noise_refiner_{n}_attention_to_k", 1, Z, Z)
        | blocks("lora_unet_context_refiner_{n}_feed_forward_w3", 1, Z, ZF)
        | {"lora_unet_layers_0_adaLN_modulation_0": (256, 4 * Z)},
        Family.zimage,
        "kohya-lora",
    ),
    "qwenimage-peft": (
        blocks("transformer.transformer_blocks.{n}.attn.to_q", 59, D, D)
        | blocks("transformer.transformer_blocks.{n}.img_mlp.net.0.proj", 59, D, 4 * D)
        | blocks("transformer.transformer_blocks.{n}.txt_mod.1", 59, D, 6 * D),
        Family.qwenimage,
        "peft",
    ),
    "qwenimage-kohya": (
        blocks("lora_unet_transformer_blocks_{n}_attn_add_k_proj", 59, D, D)
        | blocks("lora_unet_transformer_blocks_{n}_img_mod_1", 59, D, 6 * D),
        Family.qwenimage,
        "kohya-lora",
    ),
    "qwenimage-comfy": (
        blocks("diffusion_model.transformer_blocks.{n}.attn.to_out.0", 59, D, D)
        | blocks("diffusion_model.transformer_blocks.{n}.txt_mlp.net.2", 59, 4 * D, D),
        Family.qwenimage,
        "comfy-lora",
    ),
    "qwenimage-adapter-name": (
        blocks("transformer.transformer_blocks.{n}.attn.to_v", 59, D, D),
        Family.qwenimage,
        "peft",
    ),
    "flux2-klein-4b-peft": (
        blocks("transformer.transformer_blocks.{n}.attn.to_q", 4, D, D)
        | blocks("transformer.transformer_blocks.{n}.ff.linear_in", 4, D, 6 * D)
        | blocks("transformer.single_transformer_blocks.{n}.attn.to_qkv_mlp_proj", 19, D, 9 * D)
        | blocks("transformer.single_transformer_blocks.{n}.attn.to_out", 19, 4 * D, D),
        Family.flux2,
        "peft",
    ),
    "flux2-klein-9b-bfl": (
        blocks("diffusion_model.double_blocks.{n}.img_attn.qkv", 7, K9, 3 * K9)
        | blocks("diffusion_model.double_blocks.{n}.img_mlp.0", 7, K9, 6 * K9)
        | blocks("diffusion_model.single_blocks.{n}.linear1", 23, K9, 9 * K9),
        Family.flux2,
        "bfl-lora",
    ),
    "flux2-klein-4b-kohya": (
        blocks("lora_unet_double_blocks_{n}_txt_mlp_2", 4, 3 * D, D)
        | blocks("lora_unet_single_blocks_{n}_linear2", 19, 4 * D, D),
        Family.flux2,
        "kohya-lora",
    ),
    "flux2-klein-9b-lycoris-lokr": (
        blocks("lycoris_transformer_blocks_{n}_ff_linear_in", 7, K9, 6 * K9)
        | blocks("lycoris_single_transformer_blocks_{n}_attn_to_qkv_mlp_proj", 23, K9, 9 * K9),
        Family.flux2,
        "lycoris-lokr",
    ),
}
"""Name: (modules, family, kind); the key style follows from the kind (and "adapter")."""
STYLE = {
    "kohya-lora": "kohya",
    "onetrainer": "kohya",
    "xlabs": "xlabs",
    "lycoris-lokr": "lokr",
    "lycoris-loha": "loha",
}
WIDTH = {Family.flux1: D, Family.qwenimage: D, Family.zimage: Z}
VARIANT = {"klein-4b": D, "klein-9b": K9}


def wild(name: str, rank: int = 1) -> dict[str, tuple[int, ...]]:
    modules, _, kind = WILD[name]
    return lora(modules, "adapter" if "adapter" in name else STYLE.get(kind, "peft"), rank)


@pytest.mark.parametrize("name", list(WILD))
def test_each_family_is_told_from_each_trainers_naming(tmp_path, name):
    _, family, kind = WILD[name]
    info = described(tmp_path, wild(name))
    assert (info.family, info.format) == (family, kind)
    variant = next((v for v in VARIANT if v in name), None)
    assert info.variant == variant
    assert info.transformer_width == (VARIANT[variant] if variant else WIDTH[family])
    assert info.cross_attention_width is None  # the SD width check stays out of the way


@pytest.mark.parametrize(
    "name, rank", [("flux1-kohya-with-clip", 4), ("qwenimage-adapter-name", 8), ("flux1-xlabs", 16)]
)
def test_the_rank_is_read_from_kohya_peft_adapter_and_xlabs_factors(tmp_path, name, rank):
    assert described(tmp_path, wild(name, rank)).rank == rank


@pytest.mark.parametrize("last, metadata, family", [(59, {}, Family.qwenimage), (18, {}, None)])
def test_qwen_image_attention_is_told_from_flux_by_its_60_blocks_or_not_at_all(
    tmp_path, last, metadata, family
):
    """FLUX.1's double blocks and Qwen-Image's blocks share every attention name and width:
    past FLUX.1's 19 blocks it is Qwen-Image; within them nothing tells."""
    modules = blocks("transformer.transformer_blocks.{n}.attn.to_q", last, D, D)
    modules |= blocks("transformer.transformer_blocks.{n}.attn.add_k_proj", last, D, D)
    assert described(tmp_path, lora(modules), metadata).family is family


@pytest.mark.parametrize(
    "metadata, family",
    [
        ({"ss_base_model_version": "flux1"}, Family.flux1),
        ({"modelspec.architecture": "Flux.1-dev/lora"}, Family.flux1),
        ({"modelspec.architecture": "Qwen-Image/lora"}, Family.qwenimage),
        ({"modelspec.architecture": "Z-Image/lora"}, None),  # names a family the tensors do not fit
    ],
)
def test_metadata_decides_what_the_names_leave_open_and_never_against_them(tmp_path, metadata, family):
    modules = blocks("transformer.transformer_blocks.{n}.attn.to_q", 18, D, D)
    assert described(tmp_path, lora(modules), metadata).family is family


@pytest.mark.parametrize(
    "metadata", [{"ss_base_model_version": "flux1"}, {"modelspec.architecture": "flux-1-dev/lora"}]
)
def test_a_qwen_image_lora_labelled_flux1_is_not_taken_for_either(tmp_path, metadata):
    assert described(tmp_path, wild("qwenimage-peft"), metadata).family is None


@pytest.mark.parametrize(
    "linear1_out, family, variant",
    [(7 * D, Family.flux1, None), (9 * D, Family.flux2, "klein-4b"), (8 * D, None, None)],
)
def test_flux1_and_flux2_share_bfl_names_and_the_shapes_decide(tmp_path, linear1_out, family, variant):
    modules = blocks("diffusion_model.single_blocks.{n}.linear1", 19, D, linear1_out)
    info = described(tmp_path, lora(modules))
    assert (info.family, info.variant) == (family, variant)


@pytest.mark.parametrize("last, family", [(4, None), (18, Family.flux1)])
def test_double_block_attention_alone_is_flux1_only_past_klein_4bs_five_blocks(tmp_path, last, family):
    modules = blocks("diffusion_model.double_blocks.{n}.img_attn.qkv", last, D, 3 * D)
    assert described(tmp_path, lora(modules)).family is family


def test_klein_4b_and_9b_share_names_and_are_told_apart_by_width(tmp_path):
    def klein(width: int) -> dict[str, tuple[int, ...]]:
        return lora(
            blocks("transformer.transformer_blocks.{n}.attn.to_q", 4, width, width)
            | blocks("transformer.single_transformer_blocks.{n}.attn.to_qkv_mlp_proj", 19, width, 9 * width)
        )

    four = described(tmp_path, klein(D), name="a.safetensors")
    nine = described(tmp_path, klein(K9), name="b.safetensors")
    assert (four.family, four.variant, four.transformer_width) == (Family.flux2, "klein-4b", D)
    assert (nine.family, nine.variant, nine.transformer_width) == (Family.flux2, "klein-9b", K9)
    label = {"modelspec.architecture": "Flux.2-klein-9b/lora"}
    mislabelled = described(tmp_path, klein(D), label, "c.safetensors")
    assert (mislabelled.family, mislabelled.variant) == (Family.flux2, "klein-4b")  # the shapes decide


def test_transformer_width_reads_the_header_only(tmp_path):
    path = tmp_path / "klein.safetensors"
    write_safetensors(path, wild("flux2-klein-9b-bfl"))
    header = read_safetensors_header(path)
    assert transformer_width(header) == K9 and detect_family(header) is Family.flux2


@pytest.mark.parametrize(
    "shapes, metadata",
    [
        (lora(blocks("diffusion_model.blocks.{n}.self_attn.q", 39, 5120, 5120)), {}),  # Wan
        (lora(blocks("transformer.transformer_blocks.{n}.img_mlp.gate_layer", 59, D, 3 * D)), {}),
        (wild("flux1-peft"), {"modelspec.architecture": "chroma/lora"}),
        # SD3's MMDiT blocks carry FLUX.1's diffusers double-block names, at SD3's width
        (lora(blocks("transformer.transformer_blocks.{n}.ff.net.0.proj", 23, 1536, 4 * 1536) | CLIP_L), {}),
        # Lumina 2's layers carry Z-Image's original names, at 2304 wide
        (lora(blocks("diffusion_model.layers.{n}.attention.out", 25, 2304, 2304)), {}),
    ],
    ids=["wan", "unknown-module", "chroma", "sd3", "lumina2"],
)
def test_what_nothing_tells_stays_unknown(tmp_path, shapes, metadata):
    assert described(tmp_path, shapes, metadata).family is None


def test_a_tiny_models_lora_is_told_by_names_only_its_family_has(tmp_path):
    modules = {
        "transformer.transformer_blocks.0.attn.to_q": (32, 32),
        "transformer.single_transformer_blocks.1.proj_mlp": (32, 128),
    }
    info = described(tmp_path, lora(modules))
    assert (info.family, info.variant, info.transformer_width) == (Family.flux1, None, 32)


def test_sd_files_are_told_as_before(tmp_path):
    sd15 = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640)} | CLIP_L
    peft_sd2 = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (1024, 320)}
    info = described(tmp_path, lora(sd15, "kohya"), name="a.safetensors")
    assert (info.family, info.format) == (Family.sd15, "kohya-lora")
    assert info.transformer_width is None and info.variant is None
    assert described(tmp_path, lora(sdxl, "kohya"), name="b.safetensors").family is Family.sdxl
    assert described(tmp_path, lora(peft_sd2), name="c.safetensors").family is Family.sd2
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    assert described(tmp_path, lora(sd15, "kohya"), meta, name="d.safetensors").family is Family.sdxl


# Single-file checkpoints: transformer-only files, under the original names ComfyUI and BFL ship.


def flux1_checkpoint(
    prefix: str = "", *, guidance: bool = True, channels: int = 64
) -> dict[str, tuple[int, ...]]:
    shapes = {
        "img_in.weight": (D, channels),
        "txt_in.weight": (D, 4096),
        "vector_in.in_layer.weight": (D, 768),
        "double_blocks.0.img_attn.qkv.weight": (3 * D, D),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "single_blocks.37.linear1.weight": (7 * D, D),
    }
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (D, 256)
    return {prefix + k: v for k, v in shapes.items()}


def flux2_checkpoint(width: int) -> dict[str, tuple[int, ...]]:
    return {
        "img_in.weight": (width, 128),
        "double_stream_modulation_img.lin.weight": (6 * width, width),
        "single_stream_modulation.lin.weight": (3 * width, width),
        "double_blocks.0.img_attn.qkv.weight": (3 * width, width),
        "single_blocks.0.linear1.weight": (9 * width, width),
    }


def checkpoint(tmp_path, shapes, dtype="BF16", name="model.safetensors"):
    path = tmp_path / name
    write_safetensors(path, shapes, dtype=dtype)
    return describe_checkpoint(path)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_a_flux1_transformer_file_is_flux1_dev_with_its_guidance_embedding(tmp_path, prefix):
    info = checkpoint(tmp_path, flux1_checkpoint(prefix), dtype="F8_E4M3")
    assert (info.family, info.variant, info.guidance_embeds) == (Family.flux1, "dev", True)
    assert (info.transformer_width, info.dtype, info.text_widths) == (D, "F8_E4M3", {})
    assert info.canonical_config == "black-forest-labs/FLUX.1-dev"


def test_without_a_guidance_embedding_it_is_schnell(tmp_path):
    info = checkpoint(tmp_path, flux1_checkpoint(guidance=False))
    assert (info.family, info.variant, info.guidance_embeds) == (Family.flux1, "schnell", False)
    assert info.dtype == "BF16"
    assert info.canonical_config == "black-forest-labs/FLUX.1-schnell"


@pytest.mark.parametrize(
    "shapes, words",
    [
        (flux1_checkpoint(channels=384), "a FLUX.1 Fill checkpoint"),
        (flux1_checkpoint(channels=128), "a FLUX.1 Depth or Canny checkpoint"),
        (flux1_checkpoint() | {"distilled_guidance_layer.in_proj.weight": (5120, 64)}, "a Chroma checkpoint"),
        (flux2_checkpoint(6144), r"a FLUX.2 \[dev\] checkpoint"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "not a Stable Diffusion checkpoint"),
    ],
)
def test_flow_models_lorafleet_cannot_run_are_refused_naming_the_file(tmp_path, shapes, words):
    with pytest.raises(FileRefused, match=words) as caught:
        checkpoint(tmp_path, shapes, name="download.safetensors")
    assert str(caught.value).startswith("download.safetensors: ")


@pytest.mark.parametrize("width, variant", [(D, "klein-4b"), (K9, "klein-9b")])
def test_a_flux2_klein_file_says_its_variant_by_width(tmp_path, width, variant):
    info = checkpoint(tmp_path, {"model.diffusion_model." + k: v for k, v in flux2_checkpoint(width).items()})
    assert (info.family, info.variant, info.transformer_width) == (Family.flux2, variant, width)
    assert info.guidance_embeds is False  # Klein is not guidance-distilled
    assert info.canonical_config.endswith("FLUX.2-klein-4B" if width == D else "FLUX.2-klein-9B")


def test_diffusers_named_flux_transformer_files_are_told_too(tmp_path):
    flux1 = {
        "x_embedder.weight": (D, 64),
        "single_transformer_blocks.0.proj_mlp.weight": (4 * D, D),
        "time_text_embed.guidance_embedder.linear_1.weight": (D, 256),
    }
    info = checkpoint(tmp_path, flux1, name="a.safetensors")
    assert (info.family, info.variant, info.transformer_width) == (Family.flux1, "dev", D)
    klein = {"x_embedder.weight": (K9, 128), "single_stream_modulation.linear.weight": (3 * K9, K9)}
    info = checkpoint(tmp_path, klein, name="b.safetensors")
    assert (info.family, info.variant, info.guidance_embeds) == (Family.flux2, "klein-9b", False)


def test_qwen_image_and_z_image_transformer_files_are_told_by_their_own_keys(tmp_path):
    qwen = checkpoint(
        tmp_path,
        {
            "img_in.weight": (D, 64),
            "txt_norm.weight": (3584,),
            "transformer_blocks.0.attn.to_q.weight": (D, D),
            "transformer_blocks.0.img_mlp.net.0.proj.weight": (4 * D, D),
            "transformer_blocks.59.img_mod.1.weight": (6 * D, D),
        },
        name="qwen.safetensors",
    )
    assert (qwen.family, qwen.transformer_width, qwen.variant) == (Family.qwenimage, D, None)
    zimage = checkpoint(
        tmp_path,
        {
            "cap_embedder.1.weight": (Z, 2560),
            "layers.0.adaLN_modulation.0.weight": (4 * Z, 256),
            "layers.0.attention.qkv.weight": (3 * Z, Z),
            "noise_refiner.0.attention.k_norm.weight": (128,),
        },
        name="zimage.safetensors",
    )
    assert (zimage.family, zimage.transformer_width) == (Family.zimage, Z)


def test_a_dropped_flux1_file_is_a_model_of_its_family(settings):
    drop = settings.checkpoints_dir
    drop.mkdir(parents=True)
    write_safetensors(
        drop / "flux1-schnell.safetensors", flux1_checkpoint("model.diffusion_model.", guidance=False)
    )
    model = ModelRegistry(settings).get("flux1-schnell")
    assert model.single_file and model.family is Family.flux1 and model.native_size == 1024
    assert model.config == "black-forest-labs/FLUX.1-schnell" and model.guidance_embeds is False
