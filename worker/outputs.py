"""Images out: PNGs that carry their generation parameters, uploaded under stable keys.

The "parameters" text chunk follows A1111's layout, which Civitai, InvokeAI's importer,
ComfyUI nodes and PNG-info readers parse:

    <prompt> <lora:NAME:WEIGHT> ...
    Negative prompt: <negative prompt>
    Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1, Seed: 42, Size: 64x64,
    Model hash: 0123456789, Model: tiny-sd15, Clip skip: 2, Lora hashes: "NAME: 0123456789ab, ...",
    Version: lorafleet 0.1.0

(the last line is one line in the file). A LoRA whose text-encoder weight differs is tagged
``<lora:NAME:TE:UNET>``, A1111's order. common/schema/infotext.py reads it back.
"""

from __future__ import annotations

import hashlib
import io

from lorafleet.common import __version__
from lorafleet.common.catalog.embeddings import EmbeddingInfo
from lorafleet.common.catalog.lora_files import LoraInfo
from lorafleet.common.catalog.vaes import VaeInfo
from lorafleet.common.schema.infotext import quote
from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.common.schema.prompts import PromptSyntax, format_number, lora_tag
from lorafleet.common.schema.samplers import a1111_fields


def parameters_text(
    job: GenerationJob,
    seed: int,
    loras: list[LoraInfo],
    model_hash: str | None = None,
    vae: VaeInfo | None = None,
    embeddings: list[EmbeddingInfo] | None = None,
    modules: tuple[str, ...] = (),
    controlnets: tuple = (),
    ip_adapter=None,
) -> str:
    """The A1111 "parameters" text for one image of a job (``model_hash``: a checkpoint's
    10-digit short sha256, which Civitai and PNG-info readers match models by)."""
    prompt = job.prompt.replace("\n", " ")
    tags = " ".join(
        lora_tag(info.name, spec.weight, spec.text_encoder_weight) for spec, info in zip(job.loras, loras)
    )
    lines = [f"{prompt} {tags}".strip()]
    if job.negative_prompt:
        lines.append("Negative prompt: " + job.negative_prompt.replace("\n", " "))
    fields = [
        ("Steps", str(job.steps)),
        *a1111_fields(job.sampler),
        ("CFG scale", format_number(job.cfg_scale)),
        *([("Distilled CFG Scale", format_number(job.guidance))] if job.guidance is not None else []),
        ("Seed", str(seed)),
        ("Size", f"{job.width}x{job.height}"),
        *([("Model hash", model_hash)] if model_hash else []),
        ("Model", quote(job.model)),
        *([("VAE hash", vae.short_hash), ("VAE", quote(vae.file_name))] if vae else []),
        *((f"Module {n}", quote(name)) for n, name in enumerate(modules, 1)),
        *([("Batch size", str(job.batch_size))] if job.batch_size is not None else []),
        *([("LoRA mode", job.lora_mode.value)] if job.loras and job.lora_mode is not None else []),
        *input_fields(job),
        *hires_fields(job),
        *controlnet_fields(job, controlnets),
        *ip_adapter_fields(job, ip_adapter),
        *([("Clip skip", str(job.clip_skip))] if job.clip_skip > 1 else []),
        *(
            [("Prompt syntax", job.prompt_syntax.value)]
            if job.prompt_syntax is not PromptSyntax.a1111
            else []
        ),
    ]
    if loras:
        hashes = ", ".join(f"{info.name}: {info.short_hash}" for info in loras)
        fields.append(("Lora hashes", '"' + hashes.replace('"', "'") + '"'))
    if embeddings:
        hashes = ", ".join(f"{info.name}: {info.sha256[:10]}" for info in embeddings)
        fields.append(("TI hashes", '"' + hashes.replace('"', "'") + '"'))
    fields.append(("Version", f"lorafleet {__version__}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def input_fields(job: GenerationJob) -> list[tuple[str, str]]:
    """An img2img or inpainting job's fields, as A1111 writes them, with the inputs' names."""
    if job.init_image is None:
        return []
    fields = [("Init image", job.init_image)]
    if job.mask_image is not None:
        fields += [("Mask image", job.mask_image), ("Mask blur", str(job.mask_blur))]
        if job.inpaint_padding is not None:
            fields += [("Inpaint area", "Only masked"), ("Masked area padding", str(job.inpaint_padding))]
    assert job.strength is not None
    return [("Denoising strength", format_number(job.strength)), *fields]


def hires_fields(job: GenerationJob) -> list[tuple[str, str]]:
    """The hires fix as A1111 writes it (its Size stays the first pass's)."""
    if job.hr_scale is None:
        return []
    fields = [
        ("Denoising strength", format_number(job.hr_strength)),
        ("Hires upscale", format_number(job.hr_scale)),
    ]
    if job.hr_steps is not None:
        fields.append(("Hires steps", str(job.hr_steps)))
    return [*fields, ("Hires upscaler", job.hr_upscaler)]


def controlnet_fields(job: GenerationJob, infos: tuple) -> list[tuple[str, str]]:
    """A1111's ``ControlNet N`` (Module none: the image is the map), and lorafleet's
    ``ControlNet N image`` naming the map in the object store."""
    fields = []
    for n, (spec, info) in enumerate(zip(job.controlnets, infos)):
        unit = (
            f"Module: none, Model: {spec.model} [{info.short_hash}], Weight: {format_number(spec.weight)}, "
            f"Resize Mode: Just Resize, Guidance Start: {format_number(spec.start)}, "
            f"Guidance End: {format_number(spec.end)}"
        )
        fields += [(f"ControlNet {n}", quote(unit)), (f"ControlNet {n} image", spec.image)]
    return fields


def ip_adapter_fields(job: GenerationJob, info) -> list[tuple[str, str]]:
    """lorafleet's ``IP-Adapter`` (model, hash, weight) and ``IP-Adapter images`` (their names)."""
    if job.ip_adapter is None or info is None:
        return []
    unit = (
        f"Model: {job.ip_adapter.model} [{info.short_hash}], Weight: {format_number(job.ip_adapter.weight)}"
    )
    return [("IP-Adapter", quote(unit)), ("IP-Adapter images", quote(" ".join(job.ip_adapter.images)))]


def encode_png(image, parameters: str) -> bytes:
    """PNG bytes of a PIL image with the parameters chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
