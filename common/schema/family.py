"""Model families: which base architecture a model, a LoRA or an embedding was made for.

A LoRA only fits the family it was trained on; the resolver refuses a mismatch at submit.
The width of the text embedding that cross-attention reads tells the SD families apart when
nothing else does: 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL, both text encoders side by side).

The flow-matching families (FLUX.1, Z-Image, Qwen-Image, FLUX.2 Klein) denoise with a
transformer, sample with their own flow-match Euler scheduler and read T5 or LLM text
encoders, on which A1111's weights mean nothing. ``TRAITS`` holds what differs per family:
the defaults of its reference diffusers pipeline and what a job may ask of it.

Semantics of ``cfg_scale`` on every family: true classifier-free guidance against the
negative prompt, guided = neg + cfg * (pos - neg), so 1 is off (A1111's, Forge's and
ComfyUI's meaning). ``guidance`` is the distilled guidance embedding of models that have
one (FLUX.1 dev and Krea: Forge's "Distilled CFG Scale").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Family(str, Enum):
    """A base architecture; its value is how records, settings and the CLI spell it."""

    sd15 = "sd15"
    sd2 = "sd2"
    sdxl = "sdxl"
    flux1 = "flux1"
    zimage = "zimage"
    qwenimage = "qwenimage"
    flux2 = "flux2"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def traits(self) -> FamilyTraits:
        return TRAITS[self]

    @property
    def is_flow(self) -> bool:
        """A flow-matching transformer family (FLUX.1, Z-Image, Qwen-Image, FLUX.2)."""
        return TRAITS[self].denoiser == "transformer"

    @classmethod
    def parse(cls, value: str | Family | None) -> Family | None:
        """The family ``value`` names, None for None; ValueError names what is allowed."""
        if value is None or isinstance(value, Family):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a model family (allowed: {', '.join(f.value for f in cls)})"
            ) from None


@dataclass(frozen=True)
class FamilyTraits:
    """What a family is and what its reference pipeline does by default."""

    label: str
    """How people write the family (infotext, messages)."""
    pipeline: str
    """The diffusers pipeline class a folder or checkpoint of the family becomes."""
    denoiser: str
    """The pipeline component that denoises: ``unet`` or ``transformer``."""
    text: str
    """Its prompt encoders: ``clip`` (A1111's weights and BREAK mean something), ``t5`` or ``llm``."""
    steps: int
    cfg: float
    """Default ``cfg_scale`` in lorafleet's meaning (1 is off)."""
    size: int
    max_tokens: int
    """Tokens the prompt encoder reads; a longer prompt is cut with a warning (CLIP: chunks of 75)."""
    guidance: float | None = None
    """Default distilled guidance for models with a guidance embedding (None: the family has none)."""
    lcm: bool = False
    """An LCM-LoRA exists for the family."""
    distilled_steps: int = 4
    """Default steps on a step-distilled model of the family (schnell, distilled Klein), at CFG 1."""

    @property
    def reads_a1111_weights(self) -> bool:
        return self.text == "clip"


TRAITS: dict[Family, FamilyTraits] = {
    Family.sd15: FamilyTraits("SD 1.5", "StableDiffusionPipeline", "unet", "clip", 25, 7.0, 512, 0, lcm=True),
    Family.sd2: FamilyTraits("SD 2.x", "StableDiffusionPipeline", "unet", "clip", 25, 7.0, 768, 0, lcm=False),
    Family.sdxl: FamilyTraits(
        "SDXL", "StableDiffusionXLPipeline", "unet", "clip", 25, 7.0, 1024, 0, lcm=True
    ),
    # FluxPipeline: 28 steps, true_cfg_scale 1 (off), guidance_scale 3.5, T5 max_sequence_length 512.
    Family.flux1: FamilyTraits(
        "FLUX.1", "FluxPipeline", "transformer", "t5", 28, 1.0, 1024, 512, guidance=3.5
    ),
    # ZImagePipeline: 50 steps, guidance_scale 5 (pos + 5 (pos - neg): cfg 6 in lorafleet's meaning).
    Family.zimage: FamilyTraits("Z-Image", "ZImagePipeline", "transformer", "llm", 50, 6.0, 1024, 512),
    # QwenImagePipeline: 50 steps, true_cfg_scale 4, max_sequence_length 512.
    Family.qwenimage: FamilyTraits(
        "Qwen-Image", "QwenImagePipeline", "transformer", "llm", 50, 4.0, 1024, 512
    ),
    # Flux2KleinPipeline: 50 steps, guidance_scale 4 (true CFG; ignored by step-distilled Klein), 512 tokens.
    Family.flux2: FamilyTraits(
        "FLUX.2 Klein", "Flux2KleinPipeline", "transformer", "llm", 50, 4.0, 1024, 512
    ),
}
"""Each family's traits; the README's family table is drawn from it."""

FLOW_SIZE_MULTIPLE = 16
"""Flow families pack 2x2 latent patches of an 8x VAE: width and height are multiples of 16."""

FAMILY_BY_CROSS_ATTENTION = {768: Family.sd15, 1024: Family.sd2, 2048: Family.sdxl}
"""SD family by the width of the text embedding that cross-attention reads."""

FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": Family.sd15,  # SD 2.x shares the class: told apart by its width
    "StableDiffusionXLPipeline": Family.sdxl,
    "StableDiffusionInpaintPipeline": Family.sd15,  # inpainting models: a 9-channel UNet
    "StableDiffusionXLInpaintPipeline": Family.sdxl,
    "FluxPipeline": Family.flux1,
    "ZImagePipeline": Family.zimage,
    "QwenImagePipeline": Family.qwenimage,
    "Flux2KleinPipeline": Family.flux2,
}
"""Family by the pipeline class in model_index.json."""


def pipeline_family(
    class_name: str, cross_attention_dim: int | None, text_activation: str | None = None
) -> Family | None:
    """The family of a diffusers pipeline from its class, its UNet's cross-attention width
    and its text encoder's activation (SD 2.x's OpenCLIP uses gelu, SD 1.x's CLIP quick_gelu)."""
    family = FAMILY_BY_PIPELINE.get(class_name)
    if family is Family.sd15 and (cross_attention_dim == 1024 or text_activation == "gelu"):
        return Family.sd2
    return family
