"""Textual-inversion embeddings: written in a prompt by name, checked against the model at
submit, added to the text encoder(s) for one job only."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from PIL import Image

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from tests.conftest import TINY, TINY_XL
from tests.worker.conftest import make_runner


def save(path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def pixels(runner, record) -> bytes:
    return Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).convert("RGB").tobytes()


@pytest.fixture
def embedded(settings):
    folder = settings.embedding_dir
    generator = torch.Generator().manual_seed(3)
    save(
        folder / "glowstyle.safetensors", {"emb_params": torch.randn(2, 32, generator=generator)}
    )  # tiny SD 1.5
    save(
        folder / "xlstyle.safetensors",
        {
            "clip_l": torch.randn(1, 32, generator=generator),
            "clip_g": torch.randn(1, 48, generator=generator),
        },
    )
    save(folder / "broken.safetensors", {"emb_params": torch.tensor([[math.nan] * 32])})
    save(folder / "wide.safetensors", {"emb_params": torch.randn(1, 768, generator=generator)})
    return settings


def test_an_embedding_in_a_prompt_is_used_for_that_job_only(embedded):
    runner = make_runner(embedded)
    job = {"model": TINY, "seed": 5, "steps": 3}
    with Client(embedded) as client:
        plain = client.submit(job | {"prompt": "a lighthouse, glowing"})
        styled = client.submit(job | {"prompt": "a lighthouse, glowstyle"})
        again = client.submit(job | {"prompt": "a lighthouse, glowing"})
        assert styled.job.embeddings == ["glowstyle"] and plain.job.embeddings == []
        hot, _ = runner.pipelines.get(runner.models.get(TINY))
        words, rows = len(hot.pipe.tokenizer), hot.pipe.text_encoder.get_input_embeddings().weight.shape[0]
        for handle in (plain, styled, again):
            assert runner.run(handle.job_id) is JobStatus.succeeded
        records = [client.get(h.job_id) for h in (plain, styled, again)]
    assert pixels(runner, records[0]) == pixels(runner, records[2])  # nothing leaked into the next job
    text = Image.open(io.BytesIO(runner.storage.get(records[1].images[0].key))).text["parameters"]
    assert 'TI hashes: "glowstyle: ' in text
    (embedded.embedding_dir / "glowstyle.safetensors").unlink()  # the same prompt, the word as plain text
    with Client(embedded) as client:
        as_text = client.submit(job | {"prompt": "a lighthouse, glowstyle"})
        assert as_text.job.embeddings == [] and runner.run(as_text.job_id) is JobStatus.succeeded
        assert pixels(runner, client.get(as_text.job_id)) != pixels(runner, records[1])
    assert len(hot.pipe.tokenizer) == words
    assert hot.pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows


def test_an_sdxl_pair_feeds_both_text_encoders(embedded):
    runner = make_runner(embedded)
    with Client(embedded) as client:
        handle = client.submit({"model": TINY_XL, "prompt": "a castle, xlstyle", "seed": 1, "steps": 2})
        assert handle.job.embeddings == ["xlstyle"]
        assert runner.run(handle.job_id) is JobStatus.succeeded
    hot, _ = runner.pipelines.get(runner.models.get(TINY_XL))
    assert (
        "xlstyle" not in hot.pipe.tokenizer.get_vocab() and "xlstyle" not in hot.pipe.tokenizer_2.get_vocab()
    )


@pytest.mark.parametrize(
    "model, prompt, words",
    [
        (TINY, "a broken thing", "holds NaN or infinite values"),
        (TINY, "a wide thing", "768-wide vectors; the model's text_encoder is 32 wide"),
        (TINY_XL, "a glowstyle castle", "is single-encoder (SD 1.x/2.x); the model is sdxl"),
        (TINY, "an xlstyle castle", "is SDXL (clip_l and clip_g)"),
    ],
)
def test_an_embedding_that_does_not_fit_is_refused_at_submit(embedded, model, prompt, words):
    with Client(embedded) as client, pytest.raises(JobRejected, match=re.escape(words)) as refused:
        client.submit({"model": model, "prompt": prompt})
    assert refused.value.field == "embeddings"


@pytest.mark.parametrize("syntax", ["a1111", "compel"])
def test_a_multi_vector_embedding_in_a_weighted_prompt_is_the_embedding(embedded, syntax):
    """The weighted paths (A1111's and compel's) expand an embedding's name as diffusers does."""
    runner = make_runner(embedded)
    job = {"model": TINY, "seed": 5, "steps": 3, "prompt_syntax": syntax}
    with Client(embedded) as client:
        handles = [
            client.submit(job | {"prompt": prompt})
            for prompt in (
                "a lighthouse, glowstyle",
                "a (lighthouse:1.0), glowstyle",
                "a lighthouse, glowing",
            )
        ]
        for handle in handles:
            assert runner.run(handle.job_id) is JobStatus.succeeded
        plain, weighted, other = (pixels(runner, client.get(h.job_id)) for h in handles)
    if syntax == "a1111":
        assert weighted == plain  # weight 1.0: the embedding's pixels exactly
    assert plain != other
