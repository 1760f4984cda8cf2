"""The prompt a flow family's encoder reads: Z-Image, Qwen-Image and FLUX.2 Klein wrap it in
their chat template before the 512-token window, so the warning about dropped tokens counts
the template's tokens too (a prompt a few tokens under 512 is cut all the same)."""

from __future__ import annotations

import re

import pytest
from diffusers import DiffusionPipeline

from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.worker.run import flow
from lorafleet.worker.tiny import make_tiny_model


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-prompts")
    built: dict[str, DiffusionPipeline] = {}

    def get(family: str) -> DiffusionPipeline:
        if family not in built:
            folder = make_tiny_model(root / f"tiny-{family}", family=family)
            built[family] = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        return built[family]

    return get


def _job(family: str, prompt: str) -> GenerationJob:
    return GenerationJob(model=f"tiny-{family}", prompt=prompt, width=64, height=64, steps=2, cfg_scale=1.0)


def _encoded_tokens(pipe, family: str, prompt: str, window: int) -> int:
    """How many of the prompt's tokens the pipeline's own encoder keeps within ``window``."""
    if family == "zimage":
        embeds, _ = pipe.encode_prompt(
            prompt=prompt, device="cpu", do_classifier_free_guidance=False, max_sequence_length=window
        )
        return embeds[0].shape[0]
    embeds, mask = pipe.encode_prompt(prompt=prompt, device="cpu", max_sequence_length=window)
    return embeds.shape[1] if mask is None else int(mask.sum())


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_a_prompt_that_fits_only_without_the_chat_template_is_cut_with_a_warning(pipes, family):
    pipe = pipes(family)
    prompt = " ".join(["a"] * 508)  # 508 tokens alone: under the window, over it with the template
    assert len(pipe.tokenizer(prompt, truncation=False).input_ids) < flow.TOKENS
    read = _encoded_tokens(pipe, family, prompt, 1024)  # what the encoder sees with room to spare
    assert read > flow.TOKENS
    assert _encoded_tokens(pipe, family, prompt, flow.TOKENS) == flow.TOKENS  # the pipeline cuts it

    [note] = flow.prompt_warnings(pipe, _job(family, prompt))
    assert note.startswith(f"prompt: {read} tokens with its chat template, {read - flow.TOKENS} past the 512")


def test_flux2_klein_counts_its_chat_template_too(pipes):
    pipe = pipes("flux2")
    prompt = " ".join(["a"] * 508)
    # written out again from Flux2KleinPipeline's _get_qwen3_prompt_embeds: the template, then the window
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    read = len(pipe.tokenizer(text, truncation=False).input_ids)
    assert read > flow.TOKENS > len(pipe.tokenizer(prompt, truncation=False).input_ids)
    [note] = flow.prompt_warnings(pipe, _job("flux2", prompt))
    assert note.startswith(f"prompt: {read} tokens with its chat template, {read - flow.TOKENS} past the 512")


@pytest.mark.parametrize("family", ["zimage", "qwenimage", "flux2"])
def test_a_short_prompt_gets_no_warning(pipes, family):
    assert flow.prompt_warnings(pipes(family), _job(family, "a lighthouse at night")) == []


def test_the_warning_names_the_family(pipes):
    [note] = flow.prompt_warnings(pipes("qwenimage"), _job("qwenimage", " ".join(["a"] * 600)))
    assert re.search(r"past the 512 Qwen-Image reads were dropped", note)
