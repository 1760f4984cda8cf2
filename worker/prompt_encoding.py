"""Text embeddings for prompts written in A1111's syntax: weights, BREAK, long prompts, clip skip.

A job whose prompts are plain text (no weights, escapes or BREAK), fit one chunk of 75
tokens and skip no layer goes to the pipeline as text, as it always has (diffusers' own encoding, the same
pixels as before). Any other prompt is encoded here, the way A1111 does it:

Semantics:
- Each prompt (common/prompts.parse_attention) is a list of (text, weight) runs. Their tokens
  fill chunks of 75; a chunk that would overflow is cut after its last comma when that comma
  is among the last 20 tokens (the rest moves to the next chunk); BREAK closes the chunk
  (even an empty one, as A1111 does).
- Each chunk is encoded on its own as [BOS] + tokens + [EOS] + padding (77 tokens, padded as
  the tokenizer pads), and the chunks' embeddings are concatenated along the token axis. The
  prompt and the negative prompt get the same number of chunks (the shorter one is padded
  with empty chunks), as the pipeline's classifier-free guidance batches them together.
- Weights ("Original" emphasis): z' = z * w per token, then z'' = z' * mean(z) / mean(z');
  a chunk whose weights are all 1 is left exactly as the encoder gave it, and one whose
  means are ~0 (|mean| <= MEAN_FLOOR * std) keeps z' (A1111 would divide by ~0).
- Clip skip c: SD 1.x/2.x use final_layer_norm(hidden_states[-c]) (c = 1 is the last layer);
  SDXL uses hidden_states[-(c + 1)] of both encoders, unnormalised, concatenated (c = 1 is
  diffusers' usual penultimate layer), and the pooled embedding of the second encoder's
  first chunk. These are diffusers' choices for ``clip_skip = c - 1``.
- SDXL with an empty negative prompt uses zeros for it when the pipeline's config asks
  (``force_zeros_for_empty_prompt``), as diffusers does.

Where this differs from A1111: A1111 runs a prompt and a negative prompt of different chunk
counts through the UNet separately unless its "pad prompt/negative prompt" option is on;
diffusers batches them, so lorafleet always pads (that option's behaviour). A multi-vector
embedding that would straddle two chunks is not moved whole to the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.common.schema.prompts import Fragment, PromptSyntax, is_plain, parse_attention

CHUNK_TOKENS = 75
"""Prompt tokens per chunk (77 with the start and end markers)."""
COMMA_BACKTRACK = 20
"""How far back from a full chunk's end a comma may be to cut the chunk there."""
MEAN_FLOOR = 1e-3
"""A chunk's mean embedding smaller than this times its spread is taken as zero: the weights'
mean restore is skipped rather than dividing by it."""


@dataclass
class _Chunk:
    tokens: list[int]
    weights: list[float]


@dataclass
class _TextEncoder:
    tokenizer: object
    encoder: object
    sdxl: bool

    @property
    def layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def token_ids(self, pipe, text: str) -> list[int]:
        """Token ids of ``text`` without markers, embedding names expanded as diffusers expands them."""
        if hasattr(pipe, "maybe_convert_prompt"):
            text = pipe.maybe_convert_prompt(text, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids

    def chunks(self, pipe, fragments: list[Fragment]) -> list[_Chunk]:
        comma = self.token_ids(pipe, ",")[0]
        chunks: list[_Chunk] = []
        current = _Chunk([], [])
        last_comma = -1

        def close() -> None:
            nonlocal current, last_comma
            chunks.append(current)
            current, last_comma = _Chunk([], []), -1

        for fragment in fragments:
            if fragment.is_break:  # A1111 closes the chunk even when it is empty
                close()
                continue
            for token in self.token_ids(pipe, fragment.text):
                if token == comma:
                    last_comma = len(current.tokens)
                elif (
                    len(current.tokens) == CHUNK_TOKENS
                    and last_comma >= 0
                    and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK
                ):  # move what follows the chunk's last comma to the next chunk
                    cut = last_comma + 1
                    rest = _Chunk(current.tokens[cut:], current.weights[cut:])
                    current = _Chunk(current.tokens[:cut], current.weights[:cut])
                    close()
                    current = rest
                if len(current.tokens) == CHUNK_TOKENS:
                    close()
                current.tokens.append(token)
                current.weights.append(fragment.weight)
        if current.tokens or not chunks:
            close()
        return chunks

    def encode(self, chunks: list[_Chunk], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token embeddings of all chunks, concatenated; the pooled embedding of the first)."""
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = self.encoder.device
        parts, pooled = [], None
        for chunk in chunks:
            filler = CHUNK_TOKENS - len(chunk.tokens)
            ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id] + [pad] * filler
            weights = [1.0, *chunk.weights, 1.0] + [1.0] * filler
            output = self.encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            if self.sdxl:
                z = output.hidden_states[-(clip_skip + 1)]
                if pooled is None and output[0].ndim == 2:  # the projection model's text_embeds
                    pooled = output[0]
            elif clip_skip == 1:
                z = output[0]
            else:
                norm = _transformer(self.encoder).final_layer_norm
                z = norm(output.hidden_states[-clip_skip])
            if any(w != 1.0 for w in weights):
                scale = torch.tensor(weights, device=device, dtype=z.dtype).reshape(1, -1, 1)
                original_mean = z.mean()
                z = z * scale
                new_mean = z.mean()
                # A1111 divides unguarded; a mean of ~0 (a layer norm's output without bias)
                # would scale by noise / noise, so there the weights stand unnormalised.
                floor = MEAN_FLOOR * float(z.std())
                if abs(float(original_mean)) > floor and abs(float(new_mean)) > floor:
                    z = z * (original_mean / new_mean)
            parts.append(z)
        return torch.cat(parts, dim=1), pooled


def _text_encoders(pipe) -> list[_TextEncoder]:
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = [_TextEncoder(pipe.tokenizer, pipe.text_encoder, sdxl)]
    if sdxl:
        encoders.append(_TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, sdxl))
    return encoders


def check_clip_skip(pipe, job: GenerationJob) -> None:
    """JobRejected when the job skips more layers than the model's text encoder has."""
    layers = min(encoder.layers for encoder in _text_encoders(pipe))
    if job.clip_skip > layers:
        raise JobRejected(
            f"clip_skip={job.clip_skip} but this model's text encoder has {layers} layers",
            field="clip_skip",
            allowed=f"1 to {layers} for this model",
        )


def prompt_arguments(pipe, job: GenerationJob) -> dict:
    """The pipeline arguments that carry the job's prompts: text where diffusers' own encoding
    means the same, embeddings (with the semantics above) otherwise."""
    check_clip_skip(pipe, job)
    if job.prompt_syntax is PromptSyntax.compel:
        return _compel_arguments(pipe, job)
    encoders = _text_encoders(pipe)
    texts = {"prompt": job.prompt, "negative_prompt": job.negative_prompt}
    fits = all(
        len(encoder.token_ids(pipe, text)) <= CHUNK_TOKENS for encoder in encoders for text in texts.values()
    )
    # Clip skip is done here too: diffusers 0.42's own clip_skip for SD 1.x/2.x looks for
    # text_model.final_layer_norm, which transformers 5's CLIPTextModel no longer has.
    if fits and job.clip_skip == 1 and all(is_plain(text) for text in texts.values()):
        return {"prompt": job.prompt, "negative_prompt": job.negative_prompt or None}
    positive = [encoder.chunks(pipe, parse_attention(job.prompt)) for encoder in encoders]
    negative = [encoder.chunks(pipe, parse_attention(job.negative_prompt)) for encoder in encoders]
    count = max(len(chunks) for chunks in positive + negative)
    for chunks in positive + negative:
        chunks.extend(_Chunk([], []) for _ in range(count - len(chunks)))
    with torch.no_grad():
        embeds, pooled = _encode_all(encoders, positive, job.clip_skip)
        negative_embeds, negative_pooled = _encode_all(encoders, negative, job.clip_skip)
    if encoders[0].sdxl and not job.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt"):
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    arguments = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if encoders[0].sdxl:
        arguments |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return arguments


def _encode_all(
    encoders: list[_TextEncoder], chunks: list[list[_Chunk]], clip_skip: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeds, pooled = [], None
    for encoder, encoder_chunks in zip(encoders, chunks):
        z, encoder_pooled = encoder.encode(encoder_chunks, clip_skip)
        embeds.append(z)
        pooled = encoder_pooled if encoder_pooled is not None else pooled
    return torch.cat(embeds, dim=-1), pooled


def _transformer(encoder):
    """The part of a CLIP text model that holds ``encoder.layers`` and ``final_layer_norm``
    (transformers 5: ``text_model`` on the projection model only; 4.x: on both)."""
    return getattr(encoder, "text_model", encoder)


@contextmanager
def _without_last_layers(encoders: list[_TextEncoder], count: int) -> Iterator[None]:
    """The text encoders with their last ``count`` layers taken out for the block (clip skip
    for compel, which has no layer choice of its own; InvokeAI does the same)."""
    if count == 0:
        yield
        return
    stacks = [_transformer(e.encoder).encoder for e in encoders]
    saved = [stack.layers for stack in stacks]
    try:
        for stack, layers in zip(stacks, saved):
            stack.layers = layers[:-count]
        yield
    finally:
        for stack, layers in zip(stacks, saved):
            stack.layers = layers


def _compel_arguments(pipe, job: GenerationJob) -> dict:
    """The job's prompts read by compel, as InvokeAI reads them (long prompts not cut)."""
    from compel import CompelForSD, CompelForSDXL, DiffusersTextualInversionManager

    encoders = _text_encoders(pipe)
    sdxl = encoders[0].sdxl
    wrapper = CompelForSDXL if sdxl else CompelForSD
    compel = wrapper(pipe, DiffusersTextualInversionManager(pipe), device=str(pipe.text_encoder.device))
    try:
        with torch.no_grad(), _without_last_layers(encoders, job.clip_skip - 1):
            result = compel(job.prompt, negative_prompt=job.negative_prompt)
    except Exception as exc:  # compel's parser raises pyparsing's errors and its own
        raise JobRejected(
            f"compel cannot read the prompt: {exc}", field="prompt", allowed="compel's (InvokeAI's) syntax"
        ) from None
    arguments = {"prompt_embeds": result.embeds, "negative_prompt_embeds": result.negative_embeds}
    if sdxl:
        arguments |= {
            "pooled_prompt_embeds": result.pooled_embeds,
            "negative_pooled_prompt_embeds": result.negative_pooled_embeds,
        }
        if not job.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt"):
            for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
                arguments[key] = torch.zeros_like(arguments[key])
    return arguments
