"""A1111 prompt syntax on real tiny pipelines: weights, BREAK, long prompts, clip skip, LoRA tags."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.worker.prompt_encoding import CHUNK_TOKENS, _text_encoders
from tests.conftest import TINY, TINY_SD2, TINY_XL
from tests.worker.conftest import make_runner
from tests.worker.test_runner import client, pixels, run  # noqa: F401  (client is a fixture)

BASE = "a lighthouse at night"
LONG = ", ".join(["red city", "blue sea", "old bridge", "gold light"] * 12)
"""A prompt of about 100 tokens on the tiny tokenizer: more than one chunk."""


def image(client, runner, **fields) -> bytes:  # noqa: F811
    record = run(client, runner, **fields)
    assert record.status is JobStatus.succeeded, record.error
    return pixels(record, runner)


@pytest.mark.parametrize("model", [TINY, TINY_SD2, TINY_XL])
def test_a_weight_of_one_changes_nothing_and_a_higher_weight_changes_the_image(client, runner, model):  # noqa: F811
    plain = image(client, runner, model=model, prompt=BASE)
    assert image(client, runner, model=model, prompt="a (lighthouse:1.0) at night") == plain
    assert image(client, runner, model=model, prompt="a (lighthouse:1.6) at night") != plain
    assert image(client, runner, model=model, prompt="a [lighthouse] at night") != plain


def test_a_plain_prompt_gives_the_pixels_of_diffusers_own_encoding(client, settings):  # noqa: F811
    """The text path is untouched: the same pixels as calling the pipeline with the text, in
    a one-row call (batching off) and in a call of the default batch size (copies fill it)."""
    from diffusers import EulerDiscreteScheduler

    for max_batch, rows in ((1, 1), (0, 4)):
        runner = make_runner(settings.model_copy(update={"max_batch": max_batch}))
        record = run(client, runner, prompt=BASE, negative_prompt="dark sketch", sampler="euler", steps=3)
        assert record.timings.batch_size == rows
        hot, _ = runner.pipelines.get(runner.models.get(TINY))
        hot.pipe.scheduler = EulerDiscreteScheduler.from_config(hot.scheduler_config)
        direct = hot.pipe(
            prompt=BASE,
            negative_prompt="dark sketch",
            num_inference_steps=3,
            guidance_scale=record.job.cfg_scale,
            width=64,
            height=64,
            num_images_per_prompt=rows,
            generator=[torch.Generator("cpu").manual_seed(record.job.seed) for _ in range(rows)],
        ).images[0]
        assert pixels(record, runner) == direct.convert("RGB").tobytes()


def test_escaped_brackets_are_the_characters_themselves(client, runner):  # noqa: F811
    # The tiny vocabulary has no brackets: "\(" reaches the tokenizer as "(" (unknown token),
    # which differs from the weighted word and from the word alone.
    escaped = image(client, runner, prompt=r"a \(lighthouse\) at night")
    assert escaped != image(client, runner, prompt="a (lighthouse) at night")


@pytest.mark.parametrize("model", [TINY, TINY_XL])
def test_a_long_prompt_is_not_cut_at_77_tokens(client, runner, model):  # noqa: F811
    hot, _ = runner.pipelines.get(runner.models.get(model))
    assert len(_text_encoders(hot.pipe)[0].token_ids(hot.pipe, LONG)) > CHUNK_TOKENS + 10
    long = image(client, runner, model=model, prompt=LONG)
    changed_tail = image(client, runner, model=model, prompt=LONG + ", snow forest")
    assert long != changed_tail, "words past the first 75 tokens must reach the model"


@pytest.mark.parametrize("model", [TINY, TINY_XL])
def test_break_starts_a_new_chunk(client, runner, model):  # noqa: F811
    joined = image(client, runner, model=model, prompt="a lighthouse, red sea")
    broken = image(client, runner, model=model, prompt="a lighthouse BREAK red sea")
    assert broken != joined
    assert image(client, runner, model=model, prompt="a lighthouse BREAK red sea") == broken


def test_a_long_negative_prompt_and_a_short_prompt_work_together(client, runner):  # noqa: F811
    short_negative = image(client, runner, prompt=BASE, negative_prompt="dark")
    long_negative = image(client, runner, prompt=BASE, negative_prompt=LONG)
    assert long_negative != short_negative


@pytest.mark.parametrize("model", [TINY, TINY_SD2, TINY_XL])
def test_clip_skip_two_uses_an_earlier_layer(client, runner, model):  # noqa: F811
    last = image(client, runner, model=model, prompt=BASE)
    assert image(client, runner, model=model, prompt=BASE, clip_skip=1) == last
    assert image(client, runner, model=model, prompt=BASE, clip_skip=2) != last


def test_clip_skip_takes_the_layer_a1111_takes(runner):
    """SD 1.x: clip skip 2 is the final layer norm of the second-to-last hidden state."""
    from lorafleet.common.schema.jobs import GenerationJob
    from lorafleet.worker.prompt_encoding import prompt_arguments

    pipe = runner.pipelines.get(runner.models.get(TINY))[0].pipe
    job = GenerationJob(model=TINY, prompt=BASE, clip_skip=2)
    embeds = prompt_arguments(pipe, job)["prompt_embeds"]
    ids = pipe.tokenizer(BASE, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(hidden[-2])
    assert torch.equal(embeds, expected)


def test_sdxl_clip_skip_follows_diffusers(runner):
    """SDXL: lorafleet's clip skip c is diffusers' clip_skip c - 1 (the same pixels)."""
    from lorafleet.common.schema.jobs import GenerationJob
    from lorafleet.worker.prompt_encoding import prompt_arguments

    pipe = runner.pipelines.get(runner.models.get(TINY_XL))[0].pipe
    ours = prompt_arguments(pipe, GenerationJob(model=TINY_XL, prompt=BASE, clip_skip=2))
    theirs = pipe.encode_prompt(BASE, device="cpu", num_images_per_prompt=1, clip_skip=1)
    assert torch.equal(ours["prompt_embeds"], theirs[0])
    assert torch.equal(ours["negative_prompt_embeds"], theirs[1])
    assert torch.equal(ours["pooled_prompt_embeds"], theirs[2])


def test_clip_skip_beyond_the_text_encoders_layers_fails_naming_it(client, runner):  # noqa: F811
    record = run(client, runner, prompt=BASE, clip_skip=3)
    assert record.status is JobStatus.failed
    assert "clip_skip=3" in record.error and "2 layers" in record.error


def test_lora_tags_in_the_prompt_apply_the_lora_and_leave_the_text(client, runner):  # noqa: F811
    tagged = run(client, runner, prompt=f"{BASE} <lora:watercolor:0.8>")
    assert tagged.status is JobStatus.succeeded, tagged.error
    assert tagged.job.prompt == BASE
    assert [(s.name, s.weight) for s in tagged.job.loras] == [("watercolor", 0.8)]
    listed = run(client, runner, prompt=BASE, loras=[{"name": "watercolor", "weight": 0.8}])
    assert pixels(tagged, runner) == pixels(listed, runner)
    text = Image.open(io.BytesIO(runner.storage.get(tagged.images[0].key))).text["parameters"]
    assert text.startswith(f"{BASE} <lora:watercolor:0.8>\n")


def test_a_tag_with_two_weights_is_text_encoder_then_unet_as_in_a1111(client, runner):  # noqa: F811
    tagged = run(client, runner, prompt=f"{BASE} <lora:watercolor:0.2:0.9>")
    assert tagged.status is JobStatus.succeeded, tagged.error
    spec = tagged.job.loras[0]
    assert (spec.weight, spec.text_encoder_weight) == (0.9, 0.2)
    listed = run(
        client, runner, prompt=BASE, loras=[{"name": "watercolor", "weight": 0.9, "text_encoder_weight": 0.2}]
    )
    assert pixels(tagged, runner) == pixels(listed, runner)
    text = Image.open(io.BytesIO(runner.storage.get(tagged.images[0].key))).text["parameters"]
    assert "<lora:watercolor:0.2:0.9>" in text


@pytest.mark.parametrize("model", [TINY, TINY_XL])
def test_compel_syntax_goes_to_compel(client, runner, model):  # noqa: F811
    plain = image(client, runner, model=model, prompt=BASE)
    compel = {"model": model, "prompt_syntax": "compel"}
    assert image(client, runner, prompt=BASE, **compel) == plain
    assert image(client, runner, prompt="a lighthouse++ at night", **compel) != plain
    blended = image(client, runner, prompt='("a lighthouse", "a castle").blend(0.7, 0.3)', **compel)
    assert blended != plain


def test_compel_clip_skip_takes_the_same_layer(client, runner):  # noqa: F811
    ours = image(client, runner, prompt=BASE, clip_skip=2)
    assert image(client, runner, prompt=BASE, clip_skip=2, prompt_syntax="compel") == ours
    hot, _ = runner.pipelines.get(runner.models.get(TINY))
    assert len(hot.pipe.text_encoder.encoder.layers) == 2, "layers taken out for clip skip are put back"


@pytest.mark.parametrize(
    "prompt, sizes",
    [
        ("a " * 60 + ", " + "a " * 14 + ", a a a a a", [75, 6]),  # the 76th token is the comma
        ("a " * 60 + ", " + "a " * 20, [61, 20]),  # cut after the comma 15 tokens back
        ("a " * 40 + ", " + "a " * 40, [75, 6]),  # the comma is too far back: cut at 75
        ("BREAK a", [0, 1]),
        ("a BREAK BREAK b", [1, 0, 1]),
        ("a BREAK", [1]),
        ("", [0]),
    ],
)
def test_chunks_are_cut_where_a1111_cuts_them(runner, prompt, sizes):
    from lorafleet.common.schema.prompts import parse_attention

    pipe = runner.pipelines.get(runner.models.get(TINY))[0].pipe
    encoder = _text_encoders(pipe)[0]
    assert [len(c.tokens) for c in encoder.chunks(pipe, parse_attention(prompt))] == sizes
