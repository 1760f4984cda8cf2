"""Prompts and sampling calls of the flow-matching families (FLUX.1; the others join here).

Semantics:
- Prompts: the encoders of these families (T5, LLMs) read words, not A1111's syntax: the
  prompt's plain text (``prompts.plain_text``) is encoded with the pipeline's own
  ``encode_prompt``, one job at a time, padded to the family's fixed token window, so a job's
  embeddings never depend on its batch companions. A prompt longer than the window is cut by
  the tokenizer, and the job's record says how many tokens were dropped.
- ``cfg_scale`` c: guided = neg + c * (pos - neg), so c <= 1 is off and the negative prompt
  is encoded only above 1 (FluxPipeline's ``true_cfg_scale``).
- ``guidance`` g: FLUX.1's distilled guidance embedding (``guidance_scale``).
- The scheduler is the pipeline's own (flow-match Euler with its shift or dynamic shifting),
  built fresh for every call from the config the model came with.
"""

from __future__ import annotations

import torch

from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.common.schema.prompts import plain_text

FLUX_TOKENS = 512
"""T5 tokens FLUX.1 reads (FluxPipeline's ``max_sequence_length``)."""

FLOW_PIPELINES = {"FluxPipeline"}
"""The pipeline classes sampled here."""


def is_flow(pipe) -> bool:
    return type(pipe).__name__ in FLOW_PIPELINES


def uses_negative(job: GenerationJob) -> bool:
    assert job.cfg_scale is not None
    return job.cfg_scale > 1


def prompt_warnings(pipe, job: GenerationJob) -> list[str]:
    """What the family's encoder will not read of the job's prompts (tokens past its window)."""
    notes = []
    prompts = [("prompt", job.prompt)] + ([("negative_prompt", job.negative_prompt)] if uses_negative(job) else [])
    for field, text in prompts:
        count = len(pipe.tokenizer_2(plain_text(text), truncation=False).input_ids)
        if count > FLUX_TOKENS:
            notes.append(
                f"{field}: {count} T5 tokens, {count - FLUX_TOKENS} past the {FLUX_TOKENS} FLUX.1 reads were dropped"
            )
    return notes


def conditioning(pipe, job: GenerationJob) -> dict[str, torch.Tensor]:
    """The job's prompt (and negative, when guided) as FluxPipeline's embeddings, batch 1."""
    out: dict[str, torch.Tensor] = {}
    texts = {"": job.prompt} | ({"negative_": job.negative_prompt} if uses_negative(job) else {})
    with torch.no_grad():
        for prefix, text in texts.items():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=plain_text(text),
                prompt_2=None,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                max_sequence_length=FLUX_TOKENS,
            )
            out[f"{prefix}prompt_embeds"] = embeds
            out[f"{prefix}pooled_prompt_embeds"] = pooled
    return out


def call_arguments(pipe, job: GenerationJob) -> dict:
    """What the call passes besides embeddings, size, steps and generators."""
    arguments: dict = {"max_sequence_length": FLUX_TOKENS, "true_cfg_scale": job.cfg_scale}
    if job.guidance is not None:
        arguments["guidance_scale"] = job.guidance
    return arguments


def make_scheduler(scheduler_config: dict):
    """A fresh copy of the model's own scheduler."""
    import diffusers

    return getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
