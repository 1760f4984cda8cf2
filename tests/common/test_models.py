"""Base models by name and their families, read from JSON configs only (no torch)."""

from __future__ import annotations

import json
import struct

import pytest

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import JobRejected, ModelError
from lorafleet.common.schema.family import Family
from lorafleet.producer import Client


def write_config_only_pipeline(folder, *, cross_attention_dim: int, prediction_type: str = "epsilon") -> None:
    """The JSON skeleton of an SD 1.x / 2.x diffusers folder (enough to resolve it, not to load it)."""
    configs = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": {"cross_attention_dim": cross_attention_dim, "sample_size": 96},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
        "scheduler/scheduler_config.json": {"prediction_type": prediction_type},
    }
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))


def write_header_only_lora(path, width: int) -> None:
    """A kohya LoRA with one cross-attention factor reading a text embedding ``width`` wide."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    size = 4 * width * 2
    header = json.dumps({key: {"dtype": "F16", "shape": [4, width], "data_offsets": [0, size]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * size)


def test_sd2_is_told_apart_from_sd15_by_its_width_and_keeps_its_prediction_type(settings):
    write_config_only_pipeline(
        settings.models_dir / "sd21", cross_attention_dim=1024, prediction_type="v_prediction"
    )
    model = ModelRegistry(settings).get("sd21")
    assert model.family is Family.sd2 and model.prediction_type == "v_prediction"
    assert model.native_size == 768


def test_an_sd2_lora_is_accepted_on_an_sd2_model_and_an_sd15_one_refused(settings):
    write_config_only_pipeline(settings.models_dir / "sd21", cross_attention_dim=1024)
    write_header_only_lora(settings.lora_dir / "sd2-style.safetensors", 1024)
    write_header_only_lora(settings.lora_dir / "sd15-style.safetensors", 768)
    with Client(settings) as client:
        handle = client.submit({"model": "sd21", "prompt": "a lighthouse", "loras": [{"name": "sd2-style"}]})
        assert handle.job.loras[0].weight == 0.75
        with pytest.raises(JobRejected, match="is for sd15 but model 'sd21' is sd2") as refused:
            client.submit({"model": "sd21", "prompt": "a lighthouse", "loras": [{"name": "sd15-style"}]})
    assert refused.value.field == "loras[0].name"


def test_a_folder_with_a_corrupt_config_is_a_clear_error_not_a_model_of_unknown_family(settings):
    folder = settings.models_dir / "broken"
    write_config_only_pipeline(folder, cross_attention_dim=768)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json cannot be read as JSON"):
        ModelRegistry(settings).get("broken")
    with (
        Client(settings) as client,
        pytest.raises(JobRejected, match="config.json cannot be read") as refused,
    ):
        client.submit({"model": "broken", "prompt": "a lighthouse"})
    assert refused.value.field == "model"


def test_an_unknown_model_is_a_model_error_listing_what_there_is(settings):
    with pytest.raises(ModelError, match="unknown model 'nope'") as caught:
        ModelRegistry(settings).get("nope")
    assert "tiny-sd15" in str(caught.value)


@pytest.mark.parametrize("ref", ["x" * 300, "~nosuchuser/model", "a" * 200 + "/" + "b" * 200])
def test_a_reference_that_cannot_be_a_path_is_an_unknown_model_not_a_crash(settings, ref):
    with pytest.raises(ModelError, match="unknown model"):
        ModelRegistry(settings).get(ref)
