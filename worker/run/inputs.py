"""The images a job brings in, made ready for its sampling call, and the pipeline that takes them.

Semantics:
- The init image is read from the object store by its sha256 (common/catalog/input_images.py),
  turned upright by its EXIF orientation, converted to RGB and, when its size differs from
  the job's, resized to it with Lanczos
  (A1111's "Just resize"). A mask is converted to one channel (white: repaint), resized the
  same way and blurred by ``mask_blur`` pixels with a Gaussian (A1111's and diffusers'
  ``mask_processor.blur``).
- img2img runs the model's own components through diffusers' image-to-image pipeline
  (``AutoPipelineForImage2Image.from_pipe``: no weight is copied, so the job's LoRAs, patched
  or on side paths, are in it), inpainting through its inpainting pipeline (a 4-channel
  model: A1111's way with an ordinary checkpoint), with ``padding_mask_crop`` for "Only
  masked". Each row of a call has its own images.
- T2I-Adapters (a job's ``controlnets`` naming them) run through diffusers' adapter pipelines
  (``StableDiffusionAdapterPipeline`` / ``StableDiffusionXLAdapterPipeline``, over the same
  components: text to image only): each unit's ``weight`` is its ``adapter_conditioning_scale``,
  ``end`` on SDXL the ``adapter_conditioning_factor`` (the share of the steps, from the first,
  it acts on); several run as diffusers' ``MultiAdapter``, each row with its own maps.
- FLUX.1's ControlNets run through ``FluxControlNetPipeline.from_pipe`` (text to image; several
  as ``FluxMultiControlNetModel``): each row its ``control_image``, each unit's ``weight`` its
  ``controlnet_conditioning_scale``, ``start`` / ``end`` its ``control_guidance_start`` / ``_end``;
  no ``control_mode`` (Union models are refused: common/catalog/controlnets.py).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorafleet.common.catalog.input_images import storage_key, upright
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.errors import JobFailed
from lorafleet.common.schema.jobs import GenerationJob

CACHED_INPUTS = 64
"""Input images' bytes kept in memory (a sweep over one photo reads it once)."""
INPAINTING_CHANNELS = 9
"""What an inpainting model's UNet reads: the latents, the mask and the masked image's latents."""


@dataclass
class InputReader:
    """Input images' bytes from the object store, the last ``CACHED_INPUTS`` kept."""

    storage: Storage

    def __post_init__(self) -> None:
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def get(self, ref: str) -> bytes:
        data = self._cache.pop(ref, None)
        if data is None:
            data = self.storage.get(storage_key(ref))
        self._cache[ref] = data
        while len(self._cache) > CACHED_INPUTS:
            self._cache.popitem(last=False)
        return data


def job_inputs(job: GenerationJob, reader: InputReader) -> dict[str, object]:
    """The job's input images as its call takes them: ``image`` (and ``mask_image``)."""
    from PIL import Image, ImageFilter

    size = (job.width, job.height)

    def rgb(ref: str):
        image = upright(Image.open(io.BytesIO(reader.get(ref)))).convert("RGB")
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    inputs: dict[str, object] = {}
    if job.controlnets:  # the control maps, each the job's size (A1111's "Just resize")
        inputs["controls"] = [rgb(spec.image) for spec in job.controlnets]
    if job.ip_adapter is not None:  # the image prompt: CLIP's processor sizes it
        inputs["ip_images"] = [
            upright(Image.open(io.BytesIO(reader.get(r)))).convert("RGB") for r in job.ip_adapter.images
        ]
    if job.init_image is None:
        return inputs
    inputs["image"] = rgb(job.init_image)
    if job.mask_image is not None:
        mask = upright(Image.open(io.BytesIO(reader.get(job.mask_image)))).convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.LANCZOS)
        if job.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(job.mask_blur))
        inputs["mask_image"] = mask
    return inputs


def pipeline_for(pipe, job: GenerationJob, controlnet=None):
    """The pipeline that samples ``job``: ``pipe`` itself, or its image-to-image, inpainting,
    ControlNet or T2I-Adapter form over the same components (``controlnet``: the job's
    ControlNets or T2I-Adapters, loaded). JobFailed for a job without an init image and a mask
    on an inpainting model, which submit lets through when it cannot read the model (a hub id,
    a folder only the workers see), and for T2I-Adapters with an init image."""
    _check_inpainting_inputs(pipe, job)
    if job.init_image is None and controlnet is None:
        return pipe
    if job.init_image is None:
        kind = "text-to-image"
    else:
        kind = "inpainting" if job.mask_image is not None else "image-to-image"
    if controlnet is not None and is_adapter(controlnet) and kind != "text-to-image":
        raise JobFailed(
            "T2I-Adapters steer text to image only: diffusers has no image-to-image or inpainting "
            "pipeline with T2I-Adapters; drop init_image, or use a ControlNet",
            job_id=job.job_id,
        )
    if controlnet is not None and type(pipe).__name__ == "FluxPipeline" and kind != "text-to-image":
        raise JobFailed(
            "lorafleet runs FLUX.1 ControlNets text to image only (diffusers' FluxControlNetPipeline); "
            "drop init_image, or the controlnets",
            job_id=job.job_id,
        )
    return derived(pipe, kind, controlnet)


def _check_inpainting_inputs(pipe, job: GenerationJob) -> None:
    unet = getattr(pipe, "unet", None)
    if unet is None or unet.config.in_channels != INPAINTING_CHANNELS:
        return
    missing = [name for name in ("init_image", "mask_image") if getattr(job, name) is None]
    if missing:
        raise JobFailed(
            f"model {job.model!r} is an inpainting model (its UNet reads {INPAINTING_CHANNELS} channels): "
            f"it repaints the masked region of an init image and needs init_image and mask_image, and this "
            f"job has no {' and '.join(missing)}; give both, or use an ordinary model for this job",
            job_id=job.job_id,
        )


_AUTO_PIPELINES = {
    "text-to-image": "AutoPipelineForText2Image",
    "image-to-image": "AutoPipelineForImage2Image",
    "inpainting": "AutoPipelineForInpainting",
}
"""diffusers' pipeline that takes a model's components for each kind of call."""
_ADAPTER_PIPELINES = {True: "StableDiffusionXLAdapterPipeline", False: "StableDiffusionAdapterPipeline"}
"""diffusers' text-to-image pipelines with T2I-Adapters, for SDXL and for SD 1.x/2.x (AutoPipeline has none)."""


def is_adapter(module) -> bool:
    """Whether a job's loaded control module is T2I-Adapters (one, or diffusers' MultiAdapter)."""
    from diffusers import MultiAdapter, T2IAdapter

    return isinstance(module, (T2IAdapter, MultiAdapter))


def derived(pipe, kind: str, controlnet=None):
    """``pipe``'s components in diffusers' ``kind`` pipeline (one of ``_AUTO_PIPELINES``; with
    ``controlnet`` when given, the adapter pipeline when it is T2I-Adapters), its progress bar
    off: ``from_pipe`` copies no weight, so the job's LoRAs, patched or on side paths, are in it.
    The hires fix's second pass is its image-to-image form."""
    import diffusers

    if controlnet is not None and is_adapter(controlnet):
        sdxl = type(pipe).__name__.startswith("StableDiffusionXL")
        pipeline = getattr(diffusers, _ADAPTER_PIPELINES[sdxl]).from_pipe(pipe, adapter=controlnet)
    elif controlnet is not None and type(pipe).__name__ == "FluxPipeline":
        pipeline = diffusers.FluxControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    else:
        auto = getattr(diffusers, _AUTO_PIPELINES[kind])
        pipeline = auto.from_pipe(pipe, **({"controlnet": controlnet} if controlnet is not None else {}))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _batch(images: list) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(
        0, 3, 1, 2
    )


def call_arguments(job: GenerationJob, inputs: list[dict[str, object]], runner=None) -> dict:
    """What the image-to-image, inpainting, ControlNet or T2I-Adapter call (``runner``, the
    pipeline) adds: one image (mask, control maps) per row; each ControlNet's weight and the
    part of the sampling it steers."""
    arguments: dict = {}
    if job.ip_adapter is not None:  # one image prompt for every row (batching.batch_key)
        arguments["ip_adapter_image"] = [inputs[0]["ip_images"]]
    if job.controlnets and getattr(runner, "adapter", None) is not None:
        arguments |= _adapter_arguments(job, inputs, type(runner).__name__ == _ADAPTER_PIPELINES[True])
    elif job.controlnets:
        single = len(job.controlnets) == 1
        flux = type(runner).__name__ == "FluxControlNetPipeline"  # it names the maps control_image
        if single:  # one map per row
            maps: object = [row["controls"][0] for row in inputs]
        elif flux:  # per ControlNet, its rows' maps (its pipeline takes a list of PIL images each)
            maps = [[row["controls"][n] for row in inputs] for n in range(len(job.controlnets))]
        else:  # per ControlNet, its rows' maps as one (rows, 3, H, W) batch in [0, 1], as PIL's give
            maps = [_batch([row["controls"][n] for row in inputs]) for n in range(len(job.controlnets))]
        arguments["control_image" if job.init_image is not None or flux else "image"] = maps
        weights = [spec.weight for spec in job.controlnets]
        arguments["controlnet_conditioning_scale"] = weights[0] if single else weights
        arguments["control_guidance_start"] = [spec.start for spec in job.controlnets]
        arguments["control_guidance_end"] = [spec.end for spec in job.controlnets]
    if job.init_image is None:
        return arguments
    arguments |= {"image": [i["image"] for i in inputs], "strength": job.strength}
    if job.mask_image is not None:
        arguments["mask_image"] = [i["mask_image"] for i in inputs]
    if job.mask_image is not None and job.inpaint_padding is not None:  # one image per call
        [row] = inputs
        arguments |= {
            "image": row["image"],
            "mask_image": row["mask_image"],
            "padding_mask_crop": job.inpaint_padding,
        }
    return arguments


def _adapter_arguments(job: GenerationJob, inputs: list[dict[str, object]], sdxl: bool) -> dict:
    """The adapter pipelines' arguments: per T2I-Adapter its rows' maps and its weight; on SDXL
    the share of the steps they act on (one ``end`` for all: submit checks it)."""
    maps = [[row["controls"][n] for row in inputs] for n in range(len(job.controlnets))]
    weights = [spec.weight for spec in job.controlnets]
    single = len(maps) == 1
    arguments = {
        "image": maps[0] if single else maps,
        "adapter_conditioning_scale": weights[0] if single else weights,
    }
    if sdxl:
        arguments["adapter_conditioning_factor"] = job.controlnets[0].end
    return arguments
