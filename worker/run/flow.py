"""Prompts and sampling calls of the flow-matching families: FLUX.1, Z-Image, Qwen-Image,
FLUX.2 Klein.

Semantics:
- Prompts: the encoders of these families (T5, LLMs) read words, not A1111's syntax: the
  prompt's plain text (``prompts.plain_text``) is encoded with the pipeline's own
  ``encode_prompt``, one job at a time, so a job's embeddings never depend on its batch
  companions (FLUX.1 and Klein pad to their fixed window; Z-Image and Qwen-Image give one
  vector per token, and only prompts of equal length share a call: batching.chunks). A
  prompt longer than the window is cut, and the job's record says how many tokens were dropped
  (Z-Image, Qwen-Image and Klein wrap the prompt in a chat template whose tokens share the
  window, so they are counted too).
- ``cfg_scale`` c, on every family: guided = neg + c * (pos - neg), so c <= 1 is off and
  the negative prompt is encoded only above 1. It is FluxPipeline's and QwenImagePipeline's
  ``true_cfg_scale`` and Flux2KleinPipeline's ``guidance_scale`` as it is, and
  ZImagePipeline's ``guidance_scale`` as c - 1 (Z-Image computes pos + g * (pos - neg)).
  Qwen-Image rescales the guided prediction to the norm of the positive one, as its
  pipeline does.
- ``guidance`` g: FLUX.1's distilled guidance embedding (FluxPipeline's ``guidance_scale``).
- The scheduler is the pipeline's own (flow-match Euler with its shift or dynamic shifting),
  built fresh for every call from the config the model came with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafleet.common.schema.errors import JobFailed
from lorafleet.common.schema.family import FLOW_SIZE_MULTIPLE
from lorafleet.common.schema.hires import LATENT_MODES, output_size
from lorafleet.common.schema.jobs import GenerationJob, Sampler
from lorafleet.common.schema.prompts import PromptSyntax, plain_text

TOKENS = 512
"""Text tokens every flow family reads (the pipelines' ``max_sequence_length``)."""


def _flux1(pipe, text: str, device: torch.device) -> dict[str, torch.Tensor]:
    embeds, pooled, _ = pipe.encode_prompt(
        prompt=text, prompt_2=None, device=device, max_sequence_length=TOKENS
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def _zimage(pipe, text: str, device: torch.device) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(
        prompt=text, device=device, do_classifier_free_guidance=False, max_sequence_length=TOKENS
    )
    return {"prompt_embeds": embeds[0].unsqueeze(0)}  # one vector per token: (1, tokens, width)


def _qwenimage(pipe, text: str, device: torch.device) -> dict[str, torch.Tensor]:
    embeds, mask = pipe.encode_prompt(prompt=text, device=device, max_sequence_length=TOKENS)
    if mask is None:  # diffusers leaves out a mask of all ones
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def _flux2(pipe, text: str, device: torch.device) -> dict[str, torch.Tensor]:
    embeds, _ = pipe.encode_prompt(prompt=text, device=device, max_sequence_length=TOKENS)
    return {"prompt_embeds": embeds}


def _t5_tokens(pipe, text: str) -> int:
    return len(pipe.tokenizer_2(text, truncation=False).input_ids)


def _chat_tokens(thinking: bool) -> Callable[[object, str], int]:
    """Z-Image's and Klein's count: the prompt as the user's turn of the chat template (as their
    pipelines' ``_encode_prompt`` / ``_get_qwen3_prompt_embeds`` write it), then the window."""

    def count(pipe, text: str) -> int:
        chat = pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        return len(pipe.tokenizer(chat, truncation=False).input_ids)

    return count


def _qwen_tokens(pipe, text: str) -> int:
    """Qwen-Image's count: the prompt in its template, less the system turn the pipeline drops."""
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(text), truncation=False).input_ids
    return len(ids) - pipe.prompt_template_encode_start_idx


@dataclass(frozen=True)
class FlowCall:
    """How one family's pipeline takes a job's prompts and guidance."""

    label: str
    encode: Callable[[object, str, torch.device], dict[str, torch.Tensor]]
    guidance: Callable[[GenerationJob], dict]
    tokens: Callable[[object, str], int]
    """How many tokens the pipeline's encoder is given for a prompt, before its window cuts."""
    templated: bool = False
    """The pipeline wraps the prompt in a chat template whose tokens share the window."""
    as_lists: bool = False
    """The pipeline takes embeddings as a list of (tokens, width) tensors (Z-Image)."""


def _flux1_guidance(job: GenerationJob) -> dict:
    extra = {"guidance_scale": job.guidance} if job.guidance is not None else {}
    return {"true_cfg_scale": job.cfg_scale} | extra


CALLS = {
    "FluxPipeline": FlowCall("FLUX.1", _flux1, _flux1_guidance, _t5_tokens),
    "ZImagePipeline": FlowCall(
        "Z-Image",
        _zimage,
        lambda job: {"guidance_scale": max(job.cfg_scale - 1, 0.0)},
        _chat_tokens(thinking=True),
        templated=True,
        as_lists=True,
    ),
    "QwenImagePipeline": FlowCall(
        "Qwen-Image",
        _qwenimage,
        lambda job: {"true_cfg_scale": job.cfg_scale},
        _qwen_tokens,
        templated=True,
    ),
    "Flux2KleinPipeline": FlowCall(
        "FLUX.2 Klein",
        _flux2,
        lambda job: {"guidance_scale": job.cfg_scale},
        _chat_tokens(thinking=False),
        templated=True,
    ),
}
"""Per pipeline class, how it is called."""


def is_flow(pipe) -> bool:
    return type(pipe).__name__ in CALLS


def _call(pipe) -> FlowCall:
    return CALLS[type(pipe).__name__]


def uses_negative(job: GenerationJob) -> bool:
    assert job.cfg_scale is not None
    return job.cfg_scale > 1


def prompt_warnings(pipe, job: GenerationJob) -> list[str]:
    """What the family's encoder will not read of the job's prompts (tokens past its window,
    counted as the pipeline gives them to its encoder: with the chat template where it has one)."""
    call = _call(pipe)
    counted = " with its chat template" if call.templated else ""
    notes = []
    prompts = [("prompt", job.prompt)] + (
        [("negative_prompt", job.negative_prompt)] if uses_negative(job) else []
    )
    for field, text in prompts:
        count = call.tokens(pipe, plain_text(text))
        if count > TOKENS:
            notes.append(
                f"{field}: {count} tokens{counted}, {count - TOKENS} past the {TOKENS} {call.label} reads "
                "were dropped"
            )
    return notes


def check(pipe, job: GenerationJob) -> None:
    """JobFailed for what the family does not have, when the producer could not tell the
    model's family at submit (a hub id, a folder only the workers see) and so let it through."""
    call = _call(pipe)
    problems = []
    if job.sampler is not Sampler.euler:
        problems.append(f"sampler {job.sampler.value} (it samples with its own flow-match Euler scheduler)")
    if job.clip_skip != 1:
        problems.append(f"clip_skip {job.clip_skip}")
    if job.prompt_syntax is PromptSyntax.compel:
        problems.append("compel's prompt syntax")
    if job.embeddings:
        problems.append("textual-inversion embeddings")
    problems += _hires_problems(call, job)
    if problems:
        raise JobFailed(
            f"model {job.model!r} is {call.label}, which has no {', '.join(problems)}; register it with its "
            "family (lorafleet models add NAME SOURCE --family ...) so that submit applies the family's "
            "defaults and refusals",
            job_id=job.job_id,
        )


def _hires_problems(call: FlowCall, job: GenerationJob) -> list[str]:
    """What of a job's hires fix the family cannot run (producer/input_checks.py says why)."""
    if job.hr_scale is None:
        return []
    if call.label == "FLUX.2 Klein":
        return ["hires fix (no image-to-image pipeline in diffusers)"]
    if job.hr_upscaler in LATENT_MODES:
        return [
            f"latent upscaler {job.hr_upscaler!r} for the hires fix (the hires fix upscales a flow family's images in pixels only)"
        ]
    width, height = output_size(job)
    if width % FLOW_SIZE_MULTIPLE or height % FLOW_SIZE_MULTIPLE:
        return [f"hires fix at {width}x{height} (it samples multiples of {FLOW_SIZE_MULTIPLE})"]
    return []


def conditioning(pipe, job: GenerationJob, device: torch.device) -> dict[str, torch.Tensor]:
    """The job's prompt (and negative, when guided) as the pipeline's embeddings, batch 1,
    encoded on ``device`` (where the text encoders are)."""
    check(pipe, job)
    call = _call(pipe)
    out: dict[str, torch.Tensor] = {}
    texts = {"": job.prompt} | ({"negative_": job.negative_prompt} if uses_negative(job) else {})
    with torch.no_grad():
        for prefix, text in texts.items():
            out |= {
                f"{prefix}{name}": value
                for name, value in call.encode(pipe, plain_text(text), device).items()
            }
    return out


def call_arguments(pipe, job: GenerationJob, batch: dict[str, torch.Tensor]) -> dict:
    """The call's arguments besides size, steps, generators and the callback: the batch's
    embeddings as the pipeline takes them, guidance and the token window."""
    call = _call(pipe)
    if call.as_lists:
        batch = {name: list(value.unbind(0)) for name, value in batch.items()}
    return batch | call.guidance(job) | {"max_sequence_length": TOKENS}


def make_scheduler(scheduler_config: dict):
    """A fresh copy of the model's own scheduler."""
    import diffusers

    return getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
