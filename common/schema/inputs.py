"""What a job may bring in besides its prompt: an init image (img2img) and a mask (inpainting),
named by the sha256 of their bytes in the object store (common/catalog/input_images.py).

A1111's names and defaults: ``strength`` is its "Denoising strength" (0.75), ``mask_blur``
its "Mask blur" (4 px), ``inpaint_padding`` the padding of its "Inpaint area: Only masked"
(None: the whole picture is inpainted).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

IMAGE_REF = re.compile(r"^sha256:[0-9a-f]{64}$")
IMAGE_SOURCE = re.compile(r"^(sha256:[0-9a-f]{64}|https?://\S{1,2000})$")
"""What a job may give: a stored image's name, or an http(s) URL fetched and stored at submit."""
IMAGE_REF_ALLOWED = (
    "sha256:<64 hex digits>, as POST /v1/images (or the CLI's --init-image FILE) returns, or an http(s) URL"
)
DEFAULT_STRENGTH = 0.75
"""A1111's default denoising strength for img2img and inpainting."""
DEFAULT_MASK_BLUR = 4
"""A1111's default mask blur, in pixels."""
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256

InputImage = Annotated[
    str,
    StringConstraints(pattern=IMAGE_SOURCE.pattern),
    Field(description=f"An input image in the object store: {IMAGE_REF_ALLOWED}."),
]
Strength = Annotated[
    float,
    Field(
        gt=0.0,
        le=1.0,
        description="How much of the init image is noised away (A1111's Denoising strength): 1 keeps "
        f"nothing of it; it runs about strength x steps steps. None with an init image: {DEFAULT_STRENGTH}.",
    ),
]
MaskBlur = Annotated[
    int,
    Field(ge=0, le=MAX_MASK_BLUR, description="Pixels the mask's edge is blurred by (A1111's Mask blur)."),
]
InpaintPadding = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_INPAINT_PADDING,
        description="Inpaint only the masked region, cropped with this many pixels around it and scaled to "
        "the job's size (A1111's 'Only masked' padding). None: the whole picture.",
    ),
]


MAX_CONTROLNETS = 3
"""ControlNets one job may use together."""


class ControlNetSpec(BaseModel):
    """One ControlNet (or T2I-Adapter) of a job: which, its control image (the map itself:
    lorafleet runs no preprocessor), how strongly and over which part of the sampling (A1111's
    Weight, Guidance Start and Guidance End; a T2I-Adapter's part is what diffusers' adapter
    pipelines allow: producer/input_checks.py)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    image: InputImage
    weight: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    start: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    end: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0

    @model_validator(mode="after")
    def _span(self) -> ControlNetSpec:
        if self.start >= self.end:
            raise ValueError(f"start {self.start:g} must be before end {self.end:g}")
        return self


MAX_IP_IMAGES = 4


class IpAdapterSpec(BaseModel):
    """A job's IP-Adapter: which (autoimport/ip_adapter), its image prompt (stored images) and
    how strongly it steers (diffusers' IP-Adapter scale)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    images: Annotated[list[InputImage], Field(min_length=1, max_length=MAX_IP_IMAGES)]
    weight: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
