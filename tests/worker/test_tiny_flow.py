"""The tiny flow-matching pipelines: real diffusers folders that load offline and sample a
64x64 image in 2 steps, the same for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafleet.worker.tiny import make_tiny_model

PIPELINES = {
    "flux1": "FluxPipeline",
    "flux1-schnell": "FluxPipeline",
    "zimage": "ZImagePipeline",
    "qwenimage": "QwenImagePipeline",
    "flux2": "Flux2KleinPipeline",
}
FAMILIES = tuple(PIPELINES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny pipeline, written once for the module (seed 0)."""
    root = tmp_path_factory.mktemp("tiny-flow")
    return {family: make_tiny_model(root / family, family=family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipelines(folders) -> dict:
    from diffusers import DiffusionPipeline

    return {family: DiffusionPipeline.from_pretrained(str(path)) for family, path in folders.items()}


def _sample(pipe, family: str, seed: int) -> np.ndarray:
    extra = {} if family == "flux2" else {"negative_prompt": "dark"}  # Klein guides against ""
    result = pipe(
        prompt="a red cat in the city at night",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
    )
    return result.images


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            found[f"{path.parent.name}:{key}"] = value
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_is_the_family_pipeline_and_loads_offline(folders, pipelines, family):
    index = json.loads((folders[family] / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    assert type(pipelines[family]).__name__ == PIPELINES[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_make_a_64px_image_that_the_seed_fixes(pipelines, family):
    pipe = pipelines[family]
    first = _sample(pipe, family, seed=1)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    assert np.array_equal(first, _sample(pipe, family, seed=1))
    assert not np.array_equal(first, _sample(pipe, family, seed=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_seed_writes_the_same_weights(folders, tmp_path, family):
    again = _weights(make_tiny_model(tmp_path / "again", family=family, seed=0))
    first = _weights(folders[family])
    assert again.keys() == first.keys()
    assert not [k for k in first if not torch.equal(first[k], again[k])]
    other = _weights(make_tiny_model(tmp_path / "other", family=family, seed=1))
    assert [k for k in first if not torch.equal(first[k], other[k])]


def test_flux1_is_dev_shaped_with_a_guidance_embedding_and_schnell_without(pipelines):
    assert pipelines["flux1"].transformer.config.guidance_embeds is True
    assert pipelines["flux1-schnell"].transformer.config.guidance_embeds is False
    assert pipelines["flux1"].scheduler.config.use_dynamic_shifting is True
    assert pipelines["flux1-schnell"].scheduler.config.use_dynamic_shifting is False


@pytest.mark.parametrize("family", FAMILIES)
def test_each_transformer_has_more_than_one_block_of_each_kind(pipelines, family):
    transformer = pipelines[family].transformer
    kinds = {
        "zimage": ("layers", "noise_refiner", "context_refiner"),
        "qwenimage": ("transformer_blocks",),
    }.get(family, ("transformer_blocks", "single_transformer_blocks"))
    for kind in kinds:
        assert len(getattr(transformer, kind)) >= (1 if "refiner" in kind else 2), kind


@pytest.mark.parametrize("family", FAMILIES)
def test_every_text_encoder_reads_every_id_its_tokenizer_makes(pipelines, family):
    pipe = pipelines[family]
    pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    for encoder_name, tokenizer_name in pairs:
        encoder, tokenizer = getattr(pipe, encoder_name, None), getattr(pipe, tokenizer_name, None)
        if encoder is None:
            continue
        config = encoder.config.get_text_config()
        assert config.vocab_size == len(tokenizer), encoder_name
        ids = [getattr(config, f"{name}_token_id", None) for name in ("bos", "eos", "pad")]
        ids += [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
        assert all(i is None or 0 <= i < config.vocab_size for i in ids), (encoder_name, ids)


def test_qwen_image_drops_exactly_the_system_part_of_its_template(pipelines):
    pipe = pipelines["qwenimage"]
    system, user = pipe.prompt_template_encode.split("{}")[0].rsplit("<|im_start|>user\n", 1)
    assert not user
    kept = pipe.tokenizer(system + "<|im_start|>user\n").input_ids
    assert len(kept) == pipe.prompt_template_encode_start_idx == 34


def test_an_unknown_family_is_refused_with_the_allowed_ones():
    with pytest.raises(
        ValueError, match="sd15, sd15-inpainting, sd2, sdxl, flux1, flux1-schnell, zimage, qwenimage, flux2"
    ):
        make_tiny_model(Path("/nonexistent"), family="sd3")


def test_the_cli_offers_the_families_the_worker_builds():
    from lorafleet.producer.cli.worker import TINY_FAMILIES as OFFERED
    from lorafleet.worker.tiny import TINY_FAMILIES

    assert OFFERED == TINY_FAMILIES
