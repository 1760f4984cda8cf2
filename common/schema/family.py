"""Model families: which base architecture a model, a LoRA or an embedding was made for.

A LoRA only fits the family it was trained on; the resolver refuses a mismatch at submit.
The width of the text embedding that cross-attention reads tells the families apart when
nothing else does: 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL, both text encoders side by side).
"""

from __future__ import annotations

from enum import Enum


class Family(str, Enum):
    """A base architecture; its value is how records, settings and the CLI spell it."""

    sd15 = "sd15"
    sd2 = "sd2"
    sdxl = "sdxl"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

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


FAMILY_BY_CROSS_ATTENTION = {768: Family.sd15, 1024: Family.sd2, 2048: Family.sdxl}
"""Family by the width of the text embedding that cross-attention reads."""

FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": Family.sd15,  # SD 2.x shares the class: told apart by its width
    "StableDiffusionXLPipeline": Family.sdxl,
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
