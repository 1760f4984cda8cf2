"""What a job may ask of its model's family, and the family's defaults, at submit.

The SD families (sd15, sd2, sdxl) keep the schema's defaults (steps 25, CFG 7, Euler a).
The flow-matching families take theirs from their reference diffusers pipeline
(``common/schema/family.TRAITS``) and refuse what they do not have: any sampler but their
own flow-match Euler scheduler (``euler``), the LCM recipe, clip skip, textual-inversion
embeddings, a separate VAE, ``guidance`` on a model without a guidance embedding, and sizes
that are not multiples of 16; the hires fix upscales with Lanczos unless told otherwise
(A1111's default, a latent upscaler, cannot stretch their latents). Step-distilled models (schnell, distilled Klein) default to 4
steps without CFG. A1111's weights and
BREAK mean nothing to a T5 or LLM encoder: the worker reads the prompt's plain words and
the record says so.
"""

from __future__ import annotations

from lorafleet.common.catalog.models import ModelRef
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.family import FLOW_SIZE_MULTIPLE
from lorafleet.common.schema.jobs import GenerationJob, Sampler
from lorafleet.common.schema.prompts import PromptSyntax, is_plain

FLOW_HIRES_UPSCALER = "Lanczos"
"""The hires fix's upscaler on a flow family when the job names none: their latents are
patches, so the fix upscales in pixels (producer/input_checks.py)."""


def apply_family_rules(job: GenerationJob, model: ModelRef, where: str, warnings: list[str]) -> None:
    """Fill ``job``'s family defaults where the producer gave none; refuse what the family lacks."""
    family = model.family
    given = job.model_fields_set
    if family is None or not family.is_flow:
        if job.guidance is not None:
            name = family.traits.label if family else "this model's family"
            raise JobRejected(
                f"model {model.key!r} ({name}) has no distilled guidance embedding",
                field=f"{where}guidance",
                allowed="leave guidance out: cfg_scale is this model's guidance",
            )
        return
    traits = family.traits
    label = f"model {model.key!r} is {traits.label}"
    if job.lcm:
        raise JobRejected(
            f"{label}, for which there is no LCM-LoRA",
            field=f"{where}lcm",
            allowed="lcm only on SD 1.5 and SDXL models",
        )
    if "sampler" in given and job.sampler is not Sampler.euler:
        raise JobRejected(
            f"{label}, which samples with its own flow-match Euler scheduler, not {job.sampler.value}",
            field=f"{where}sampler",
            allowed="euler (the default on this family)",
        )
    if job.clip_skip != 1:
        raise JobRejected(
            f"{label}, whose text encoder is not read by layer",
            field=f"{where}clip_skip",
            allowed="1 (leave it out)",
        )
    if job.vae is not None:
        raise JobRejected(
            f"{label}, which decodes with its own VAE (a different latent space than SD's)",
            field=f"{where}vae",
            allowed="leave vae out on this family",
        )
    if job.guidance is not None and model.guidance_embeds is False:  # None: not readable here
        raise JobRejected(
            f"{label} without a distilled guidance embedding"
            + (" (as FLUX.1 schnell)" if family.value == "flux1" else ""),
            field=f"{where}guidance",
            allowed="leave guidance out; cfg_scale above 1 guides against the negative prompt",
        )
    for field in ("width", "height"):
        value = getattr(job, field)
        if value is not None and value % FLOW_SIZE_MULTIPLE:
            raise JobRejected(
                f"{label}, which draws sizes in multiples of {FLOW_SIZE_MULTIPLE}, not {value}",
                field=f"{where}{field}",
                allowed=f"a multiple of {FLOW_SIZE_MULTIPLE} (e.g. {value - value % FLOW_SIZE_MULTIPLE} or "
                f"{value - value % FLOW_SIZE_MULTIPLE + FLOW_SIZE_MULTIPLE})",
            )
    job.sampler = Sampler.euler
    if job.hr_scale is not None and "hr_upscaler" not in given:
        job.hr_upscaler = FLOW_HIRES_UPSCALER  # A1111's default, Latent, has no meaning here
    if "steps" not in given:
        job.steps = traits.distilled_steps if model.distilled else traits.steps
    if "cfg_scale" not in given:
        job.cfg_scale = 1.0 if model.distilled else traits.cfg
    if model.distilled and family.value == "flux2" and job.cfg_scale > 1:
        warnings.append(
            f"{where}cfg_scale {job.cfg_scale:g} is ignored by step-distilled {traits.label}: it samples without CFG"
        )
    if job.guidance is None and model.guidance_embeds:
        job.guidance = traits.guidance
    if job.prompt_syntax is PromptSyntax.compel:
        raise JobRejected(
            f"{label}: compel's syntax is for CLIP encoders",
            field=f"{where}prompt_syntax",
            allowed="a1111 (its weights are dropped on this family, with a warning)",
        )
    if not traits.reads_a1111_weights:
        for text, field in ((job.prompt, "prompt"), (job.negative_prompt, "negative_prompt")):
            if not is_plain(text):
                warnings.append(
                    f"{where}{field}: A1111 weights, brackets and BREAK mean nothing to {traits.label}'s "
                    f"{traits.text.upper()} text encoder; its plain words are used"
                )
    if job.cfg_scale <= 1 and job.negative_prompt:
        warnings.append(
            f"{where}negative_prompt is unused at cfg_scale {job.cfg_scale:g}: {traits.label} guides "
            "against it only above 1"
        )
