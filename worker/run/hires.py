"""A1111's hires fix on a worker (common/schema/hires.py says what it means): the first pass's
output as the upscaler wants it, and the upscale. The second pass runs in the model's
image-to-image pipeline (worker/run/inputs.py's ``derived``), as an img2img job does."""

from __future__ import annotations

import torch

from lorafleet.common.schema.hires import LATENT_MODES, PIXEL_MODES, output_size
from lorafleet.common.schema.jobs import GenerationJob


def first_output(job: GenerationJob) -> str:
    """What the first pass returns: latents for a latent upscaler, images for a pixel one."""
    return "latent" if job.hr_upscaler in LATENT_MODES else "pil"


def upscaled(pipe, job: GenerationJob, first, upscaler=None):
    """The first pass's output at the second pass's size: latents interpolated by torch,
    images resized by PIL, or (``upscaler``: the job's ESRGAN-family model, loaded) images
    through the model, each alone (worker/upscalers.py)."""
    width, height = output_size(job)
    if upscaler is not None:
        from lorafleet.worker.upscalers import upscale

        return [upscale(upscaler, image, (width, height)) for image in first]
    if job.hr_upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[job.hr_upscaler]
        factor = pipe.vae_scale_factor
        extra = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        return torch.nn.functional.interpolate(
            first, size=(height // factor, width // factor), mode=mode, **extra
        )
    from PIL import Image

    resample = getattr(Image.Resampling, PIXEL_MODES[job.hr_upscaler])
    return [image.resize((width, height), resample) for image in first]
