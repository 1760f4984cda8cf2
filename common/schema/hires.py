"""A1111's hires fix: sample at the job's size, upscale, then sample again over the upscaled
image with a denoising strength (its "Hires upscale", "Hires upscaler", "Hires steps" and
"Denoising strength"), so a 512 px model renders 1024 px without repeating itself.

Semantics: the first pass is the job as it would run alone (its ``width`` x ``height``,
``steps``); its result is upscaled by ``hr_scale`` (to a multiple of 8) with ``hr_upscaler``:
in latent space (``Latent`` bilinear, ``Latent (antialiased)``, ``Latent (bicubic)``,
``Latent (bicubic antialiased)``, ``Latent (nearest)``, ``Latent (nearest-exact)``: torch's
interpolation of the latents) or in pixels (``Lanczos``, ``Nearest``: the decoded image
resized; an ESRGAN-family model by its name, e.g. ``4x-UltraSharp``: the decoded image through
the model, then Lanczos to the exact size, as A1111; worker/upscalers.py); the second pass is diffusers' image-to-image over it with ``hr_strength`` on a
schedule stretched (``stretched_steps``) so that it runs exactly ``hr_steps`` (None: ``steps``),
as A1111 runs its Hires steps. Both passes use the job's prompts, LoRAs and each image's own
seeded generator, continued. On FLUX.1, Qwen-Image and Z-Image the upscale is in pixels only and
the second pass is the family's own image-to-image pipeline, at a multiple of 16 (checked at
submit); FLUX.2 Klein has none.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from lorafleet.common.schema.names import check_lora_name

LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's latent upscalers: torch.nn.functional.interpolate's mode and antialias."""
PIXEL_MODES = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
"""A1111's pixel upscalers lorafleet has: PIL's resampling filters."""
UPSCALERS = (*LATENT_MODES, *PIXEL_MODES)
DEFAULT_UPSCALER = "Latent"
DEFAULT_HR_STRENGTH = 0.7
"""A1111's default denoising strength for the hires pass."""

HiresScale = Annotated[
    float,
    Field(
        gt=1.0, le=4.0, description="Upscale factor of A1111's hires fix (Hires upscale); None: no hires fix."
    ),
]
HiresSteps = Annotated[
    int, Field(ge=1, le=150, description="Steps of the hires pass (Hires steps); None: the job's steps.")
]
HiresStrength = Annotated[
    float, Field(gt=0.0, le=1.0, description="Denoising strength of the hires pass (A1111's default 0.7).")
]


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: the first's times ``scale``, to a multiple of 8 (as A1111)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def sampled_steps(job: Any, *, flow: bool = False) -> int:
    """Steps each image of a GenerationJob runs: with an init image, what its pipeline runs of
    ``steps`` at ``strength`` (``image_steps``; ``flow``: on a flow-matching family); with
    the hires fix, its second pass's hr_steps (or steps) more."""
    steps = job.steps or 0
    first = image_steps(steps, job.strength, flow=flow) if job.init_image and job.strength else steps
    second = (job.hr_steps or steps) if job.hr_scale else 0
    return first + second


def image_steps(steps: int, strength: float, *, flow: bool = False) -> int:
    """Steps diffusers' image-to-image and inpainting pipelines run of a ``steps`` schedule at
    ``strength``, as their ``get_timesteps`` counts them (the same float arithmetic):

    - SD 1.x, SD 2.x, SDXL (pipeline_stable_diffusion_img2img.py, _inpaint.py, the SDXL and
      ControlNet forms): int(steps x strength), the first ``steps - that`` skipped;
    - FLUX.1, Qwen-Image, Z-Image (pipeline_flux_img2img.py, pipeline_qwenimage_img2img.py,
      pipeline_z_image_img2img.py and their inpainting forms): int(steps - steps x strength)
      skipped, so one more where steps x strength is not whole.
    """
    if flow:
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def stretched_steps(job: Any, *, flow: bool = False) -> int:
    """The second pass's schedule n, so that its pipeline runs exactly hr_steps (or steps) of it:

    - SD 1.x, SD 2.x, SDXL: int(n x hr_strength) run, so n = ceil(hr_steps / hr_strength);
    - ``flow`` (FLUX.1, Qwen-Image, Z-Image): n - int(n - n x hr_strength) run (``image_steps``),
      which grows by 0 or 1 with n: the least n that runs hr_steps, counted from
      (hr_steps - 1) / hr_strength, below which it runs fewer.
    """
    wanted = job.hr_steps or job.steps or 0
    if not flow:
        return math.ceil(wanted / job.hr_strength - 1e-9)
    n = max(wanted, int((wanted - 1) / job.hr_strength) - 1)
    while image_steps(n, job.hr_strength, flow=True) < wanted:
        n += 1
    return n


def output_size(job: Any) -> tuple[int, int]:
    """The size of a GenerationJob's images: its own, or the hires fix's."""
    assert job.width is not None and job.height is not None
    return hires_size(job.width, job.height, job.hr_scale) if job.hr_scale else (job.width, job.height)


def check_upscaler(name: str) -> str:
    """A built-in upscaler's A1111 name (any case), or the name of an ESRGAN-family model
    (its file in the upscaler folder: checked at submit); ValueError if it is neither."""
    for known in UPSCALERS:
        if name.strip().lower() == known.lower():
            return known
    try:
        check_lora_name(name)  # a model's name: the one rule for a name inside its folder
    except ValueError as exc:
        raise ValueError(
            f"{name!r} is neither a built-in upscaler ({', '.join(UPSCALERS)}) nor an upscaler model's name: {exc}"
        ) from None
    return name


def is_model_upscaler(name: str) -> bool:
    """Whether ``name`` (as checked) names an ESRGAN-family model, not a built-in upscaler."""
    return name not in UPSCALERS


HiresUpscaler = Annotated[
    str,
    AfterValidator(check_upscaler),
    Field(
        description=(
            f"How the hires fix upscales (Hires upscaler): {', '.join(UPSCALERS)}, or the name of an "
            "ESRGAN-family model in the upscaler folder (e.g. 4x-UltraSharp)."
        )
    ),
]
