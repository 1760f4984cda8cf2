"""Textual-inversion embeddings on a worker: added for one job, removed after it.

The job's record lists the embeddings its prompts use (resolved at submit). For the job,
each is added to its text encoder(s) as new tokens (a multi-vector embedding becomes
``name``, ``name_1``, ...; diffusers rewrites the prompt to match), and removed again when
the job ends, whatever happened: the tokenizer and the token-embedding matrix are as they
were, so the next job gives the pixels it gave before (tests/worker/test_embeddings.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from lorafleet.common.catalog.embeddings import SDXL_KEYS, EmbeddingInfo
from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.pipelines import HotPipeline

logger = logging.getLogger(__name__)


def _tokens(info: EmbeddingInfo) -> list[str]:
    return [info.name] + [f"{info.name}_{i}" for i in range(1, info.vectors)]


def _encoders(hot: HotPipeline, info: EmbeddingInfo) -> list[tuple[str, object, object]]:
    """(tensor name, tokenizer, text encoder) for each text encoder the embedding feeds."""
    pipe = hot.pipe
    if len(info.widths) == 2:
        return [
            (SDXL_KEYS[0], pipe.tokenizer, pipe.text_encoder),
            (SDXL_KEYS[1], pipe.tokenizer_2, pipe.text_encoder_2),
        ]
    return [("", pipe.tokenizer, pipe.text_encoder)]


@contextmanager
def applied(hot: HotPipeline, infos: list[EmbeddingInfo]) -> Iterator[None]:
    """The embeddings ``infos`` in the pipeline's text encoders for the block, then gone."""
    if not infos:
        yield
        return
    from safetensors.torch import load_file

    loaded: list[tuple[EmbeddingInfo, object, object]] = []
    try:
        for info in infos:
            state = load_file(str(info.path))
            for key, tokenizer, encoder in _encoders(hot, info):
                if not key:
                    key = "emb_params" if "emb_params" in state else next(iter(state))
                vectors = state[key]
                vectors = vectors.reshape(info.vectors, -1)
                try:
                    hot.pipe.load_textual_inversion(
                        vectors, token=info.name, tokenizer=tokenizer, text_encoder=encoder
                    )
                except ValueError as exc:
                    raise JobFailed(f"embedding {info.name!r} cannot be loaded: {exc}") from None
                loaded.append((info, tokenizer, encoder))
            logger.info("embedding %s (%d vectors) added for this job", info.name, info.vectors)
        yield
    finally:
        for info, tokenizer, encoder in reversed(loaded):
            hot.pipe.unload_textual_inversion(tokens=_tokens(info), tokenizer=tokenizer, text_encoder=encoder)
