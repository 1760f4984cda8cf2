"""Single-file checkpoints read from their headers: family from the tensors, and what
lorafleet cannot run refused naming the file (no torch, no weights loaded)."""

from __future__ import annotations

import json
import struct

import pytest

from lorafleet.common.catalog.checkpoints import describe_checkpoint
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import BadArgument, FileRefused, JobRejected, ModelError
from lorafleet.common.schema.family import Family
from lorafleet.producer import Client

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def write_header_only(path, shapes: dict[str, list[int]], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file with these tensors (all zeros, float16)."""
    table, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        table[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        table["__metadata__"] = metadata
    raw = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def shapes_of(kind: str, channels: int = 4, width: int = 768) -> dict[str, list[int]]:
    shapes = {UNET_IN: [320, channels, 3, 3], TO_K: [320, width]}
    encoders = {
        "sd15": ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"],
        "sd2": ["cond_stage_model.model.token_embedding.weight"],
        "sdxl": [
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.ln_final.weight",
        ],
        "refiner": ["conditioner.embedders.0.model.ln_final.weight"],
        "none": [],
    }[kind]
    return shapes | {key: [8] for key in encoders}


@pytest.mark.parametrize(
    "kind, width, family",
    [("sd15", 768, Family.sd15), ("sd2", 1024, Family.sd2), ("sdxl", 2048, Family.sdxl)],
)
def test_the_family_comes_from_the_tensors_not_the_file_name(tmp_path, kind, width, family):
    path = tmp_path / "sdxl_juggernaut_v9.safetensors"  # a misleading name on purpose
    write_header_only(path, shapes_of(kind, width=width))
    info = describe_checkpoint(path)
    assert info.family is family and info.cross_attention_dim == width


def test_an_sd2_files_modelspec_metadata_gives_its_prediction_type(tmp_path):
    path = tmp_path / "sd21.safetensors"
    write_header_only(path, shapes_of("sd2", width=1024), {"modelspec.prediction_type": "v"})
    assert describe_checkpoint(path).prediction_type == "v_prediction"


@pytest.mark.parametrize(
    "shapes, words",
    [
        (shapes_of("sd15", channels=8), "instruct-pix2pix"),
        (shapes_of("refiner"), "an SDXL refiner"),
        (shapes_of("none"), "an architecture lorafleet does not know"),
        ({"lora_unet_x.lora_down.weight": [4, 8]}, "it looks like a LoRA"),
        ({"double_blocks.0.img_attn.norm.key_norm.scale": [8]}, "not a Stable Diffusion checkpoint"),
    ],
)
def test_what_lorafleet_cannot_run_is_refused_naming_the_file(tmp_path, shapes, words):
    path = tmp_path / "download.safetensors"
    write_header_only(path, shapes)
    with pytest.raises(FileRefused, match=words) as caught:
        describe_checkpoint(path)
    assert str(caught.value).startswith("download.safetensors: ")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    write_header_only(path, shapes_of("sd15"))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FileRefused, match="fall outside the file"):
        describe_checkpoint(path)


def test_a_dropped_checkpoint_is_a_model_by_its_name_and_a_bad_one_is_refused_at_submit(settings):
    drop = settings.checkpoints_dir
    drop.mkdir(parents=True)
    write_header_only(drop / "dreamshaper_8.safetensors", shapes_of("sd15"))
    write_header_only(drop / "inpaint.safetensors", shapes_of("sd15", channels=9))
    (drop / "old.ckpt").write_bytes(b"\x80\x04pickle")
    registry = ModelRegistry(settings)
    assert {"dreamshaper_8", "inpaint"} <= set(registry.local_names())
    model = registry.get("dreamshaper_8")
    assert model.single_file and model.family is Family.sd15 and model.native_size == 512
    assert model.config == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the family's canonical configs
    with pytest.raises(ModelError, match="pickled .ckpt checkpoint"):
        registry.get("old")
    with Client(settings) as client:
        with pytest.raises(JobRejected, match="'inpaint' is an inpainting model") as refused:
            client.submit({"model": "inpaint", "prompt": "x"})  # no init image or mask
        assert refused.value.field == "init_image"
        assert registry.get("inpaint").config == "stable-diffusion-v1-5/stable-diffusion-inpainting"
        handle = client.submit({"model": "dreamshaper_8", "prompt": "x"})
        assert handle.job.model == "dreamshaper_8" and handle.queue == "lorafleet.model.dreamshaper_8"


def test_registering_a_checkpoint_checks_it_and_keeps_its_config(settings, tmp_path):
    import redis

    good, bad = tmp_path / "juggernaut.safetensors", tmp_path / "refiner.safetensors"
    write_header_only(good, shapes_of("sdxl", width=2048))
    write_header_only(bad, shapes_of("refiner"))
    registry = ModelRegistry(settings, redis.Redis.from_url(settings.broker_url))
    ref = registry.register("jugg", str(good), config="/srv/configs/sdxl-base")
    assert ref.family is Family.sdxl and ref.config == "/srv/configs/sdxl-base"
    again = ModelRegistry(settings, registry.redis).get("jugg")
    assert again.single_file and again.config == "/srv/configs/sdxl-base" and again.family is Family.sdxl
    with pytest.raises(BadArgument, match="an SDXL refiner"):
        registry.register("ref", str(bad))
    assert "ref" not in registry.registered()  # nothing half-registered
    with pytest.raises(BadArgument, match="only a single-file checkpoint takes --config"):
        registry.register("folder", str(settings.models_dir / "tiny-sd15"), config="/srv/x")
    with pytest.raises(BadArgument, match="the file's tensors say sdxl, not sd15"):
        registry.register("liar", str(good), family=Family.sd15)
