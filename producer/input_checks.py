"""What a job brings in, checked at submit: its init image and mask, and its ControlNets.

Each image must be in the object store and decode within the pixel limit; a mask must be its
init image's size; each ControlNet must be known (the drop folder, then the fleet's registry)
and made for the model's text encoder width (a FLUX.1 ControlNet: for a FLUX.1 model of its
transformer width, text to image), and so must a hires fix's ESRGAN-family upscaler. The job's size defaults to its init image's (to
a multiple of 8), its strength to A1111's 0.75. A job's T2I-Adapters (named as ControlNets) must
be what diffusers' adapter pipelines run (``_t2i_adapters``). A refusal names the field.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from lorafleet.common.catalog.controlnets import ControlNetCatalog, ControlNetError, ControlNetInfo
from lorafleet.common.catalog.input_images import InputImages
from lorafleet.common.catalog.ip_adapters import IpAdapterCatalog, IpAdapterError
from lorafleet.common.catalog.models import ModelRef
from lorafleet.common.catalog.t2i_adapters import misfit, unet_widths
from lorafleet.common.catalog.upscalers import UpscalerCatalog, UpscalerError
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.family import FLOW_SIZE_MULTIPLE, Family
from lorafleet.common.schema.hires import (
    LATENT_MODES,
    PIXEL_MODES,
    UPSCALERS,
    is_model_upscaler,
    output_size,
)
from lorafleet.common.schema.inputs import DEFAULT_STRENGTH
from lorafleet.common.schema.jobs import MAX_SIZE, MIN_SIZE, GenerationJob
from lorafleet.producer.image_urls import fetch_image

URL_KEPT_SECONDS = 60.0
"""How long an image fetched by URL stands for that URL (the jobs of one batch fetch it once)."""
FLOW_IMAGES_IN = {"flux1", "qwenimage", "zimage"}
"""Flow families whose diffusers pipelines take an init image and a mask."""
FLOW_CONTROLNETS = {"flux1"}
"""Flow families with a ControlNet pipeline in diffusers (FLUX.1's ``FluxControlNetPipeline``)."""


class InputChecks:
    def __init__(
        self,
        images: Callable[[], InputImages] | None,
        controlnets: ControlNetCatalog | None,
        ip_adapters: IpAdapterCatalog | None = None,
        url_hosts: set[str] | None = None,
        upscalers: UpscalerCatalog | None = None,
    ) -> None:
        self._images = images  # opened on the first job that brings an image
        self._sizes: dict[str, tuple[int, int]] = {}  # by sha256: the bytes never change
        self._urls: dict[str, tuple[str, float]] = {}  # URL -> (its stored name, when fetched)
        self.controlnets = controlnets
        self.ip_adapters = ip_adapters
        self.upscalers = upscalers
        self.url_hosts = url_hosts or set()

    def check(self, job: GenerationJob, model: ModelRef, where: str, warnings: list[str]) -> None:
        if model.inpainting and (job.init_image is None or job.mask_image is None):
            field = "init_image" if job.init_image is None else "mask_image"
            raise JobRejected(
                f"model {model.key!r} is an inpainting model (its UNet reads 9 channels): it repaints the "
                "masked region of an init image",
                field=f"{where}{field}",
                allowed="init_image and mask_image on this model, or an ordinary model for text to image",
            )
        if job.init_image is None and not job.controlnets and job.ip_adapter is None:
            return
        if model.family is not None and model.family.is_flow:
            self._flow_family(job, model, where)
        if job.init_image is not None:
            multiple = FLOW_SIZE_MULTIPLE if model.family is not None and model.family.is_flow else 8
            self._init_image(job, where, warnings, multiple)
        controls = [
            self._controlnet(s, model, f"{where}controlnets[{n}]") for n, s in enumerate(job.controlnets)
        ]
        if any(info.adapter is not None for info in controls):
            self._t2i_adapters(job, model, controls, where)
        if job.ip_adapter is not None:
            self._ip_adapter(job.ip_adapter, model, f"{where}ip_adapter")
        if job.controlnets and job.inpaint_padding is not None:
            raise JobRejected(
                "Only masked inpainting crops one image per call, which ControlNets do not follow",
                field=f"{where}inpaint_padding",
                allowed="no inpaint_padding with controlnets (the whole picture is inpainted)",
            )

    def _flow_family(self, job: GenerationJob, model: ModelRef, where: str) -> None:
        """On the flow families: init images and masks where diffusers has their image-to-image
        and inpainting pipelines (FLUX.1, Qwen-Image, Z-Image); ControlNets on FLUX.1, text to
        image (diffusers' ``FluxControlNetPipeline``); no IP-Adapters."""
        assert model.family is not None
        label = model.family.traits.label
        if job.controlnets and model.family.value not in FLOW_CONTROLNETS:
            raise JobRejected(
                f"model {model.key!r} is {label}; ControlNets run on SD 1.x, SD 2.x, SDXL and FLUX.1",
                field=f"{where}controlnets",
                allowed="no controlnets on this model",
            )
        if job.controlnets and job.init_image is not None:
            raise JobRejected(
                f"model {model.key!r} is {label}: lorafleet runs its ControlNets text to image only",
                field=f"{where}init_image",
                allowed="no init_image with controlnets on this model (on SD 1.x, SD 2.x and SDXL both run)",
            )
        if job.ip_adapter is not None:
            raise JobRejected(
                f"model {model.key!r} is {label}; IP-Adapters run on SD 1.x, SD 2.x and SDXL",
                field=f"{where}ip_adapter",
                allowed="no ip_adapter on this model",
            )
        if job.init_image is not None and model.family.value not in FLOW_IMAGES_IN:
            raise JobRejected(
                f"model {model.key!r} is {label}, which has no image-to-image pipeline in diffusers",
                field=f"{where}init_image",
                allowed="init images on SD 1.x, SD 2.x, SDXL, FLUX.1, Qwen-Image and Z-Image",
            )

    def check_hires(self, job: GenerationJob, model: ModelRef, where: str) -> None:
        """The hires fix's second pass must fit the size limit, on a family that has it."""
        if job.hr_scale is None:
            return
        if model.family is not None and model.family.is_flow:
            self._flow_hires(job, model, where)
        if is_model_upscaler(job.hr_upscaler):  # an ESRGAN-family model: known here or registered
            if self.upscalers is None:
                raise JobRejected("this submitter has no upscaler folder", field=f"{where}hr_upscaler")
            try:
                job.hr_upscaler = self.upscalers.get(job.hr_upscaler).name
            except UpscalerError as exc:
                allowed = f"{exc.allowed + '; or ' if exc.allowed else ''}a built-in upscaler: {', '.join(UPSCALERS)}"
                raise JobRejected(exc.reason, field=f"{where}hr_upscaler", allowed=allowed) from None
        width, height = output_size(job)
        if max(width, height) > MAX_SIZE:
            raise JobRejected(
                f"{job.width}x{job.height} upscaled {job.hr_scale:g} times is {width}x{height}",
                field=f"{where}hr_scale",
                allowed=f"a second pass of at most {MAX_SIZE} pixels a side",
            )

    @staticmethod
    def _flow_hires(job: GenerationJob, model: ModelRef, where: str) -> None:
        """On FLUX.1, Qwen-Image and Z-Image the hires fix upscales in pixels and samples again in
        their image-to-image pipelines, at a multiple of 16; FLUX.2 Klein has no such pipeline."""
        assert model.family is not None
        label = model.family.traits.label
        if model.family.value not in FLOW_IMAGES_IN:
            raise JobRejected(
                f"model {model.key!r} is {label}, which has no image-to-image pipeline in diffusers for "
                "the hires fix's second pass",
                field=f"{where}hr_scale",
                allowed="the hires fix on SD 1.x, SD 2.x, SDXL, FLUX.1, Qwen-Image and Z-Image",
            )
        if job.hr_upscaler in LATENT_MODES:
            why = (
                "its transformer cuts its latents into patches itself, and no latent upscale is built for them"
                if model.family is Family.zimage
                else "its pipeline packs its latents into 2x2 patches, which A1111's latent upscalers (made "
                "for SD's image-shaped latents) cannot stretch"
            )
            raise JobRejected(
                f"model {model.key!r} is {label}: the hires fix upscales a flow family's images in pixels "
                f"only, not with {job.hr_upscaler!r}: {why}",
                field=f"{where}hr_upscaler",
                allowed=f"a pixel upscaler on this model: {', '.join(PIXEL_MODES)} or an ESRGAN-family model "
                "(leave hr_upscaler out: Lanczos on this family)",
            )
        width, height = output_size(job)
        if width % FLOW_SIZE_MULTIPLE or height % FLOW_SIZE_MULTIPLE:
            raise JobRejected(
                f"{job.width}x{job.height} upscaled {job.hr_scale:g} times is {width}x{height}, and {label} "
                f"samples sizes that are a multiple of {FLOW_SIZE_MULTIPLE}",
                field=f"{where}hr_scale",
                allowed=f"an hr_scale that makes both sides a multiple of {FLOW_SIZE_MULTIPLE}",
            )

    def _init_image(self, job: GenerationJob, where: str, warnings: list[str], multiple: int = 8) -> None:
        assert job.init_image is not None
        job.init_image, (width, height) = self.stored(job.init_image, f"{where}init_image")
        if job.mask_image is not None:
            job.mask_image, mask = self.stored(job.mask_image, f"{where}mask_image")
            if mask != (width, height):
                raise JobRejected(
                    f"the mask is {mask[0]}x{mask[1]} but the init image {width}x{height}",
                    field=f"{where}mask_image",
                    allowed="a mask of the init image's size",
                )
        if job.width is None or job.height is None:  # from the image, its shape kept
            if job.width is not None:
                scale = job.width / width
            elif job.height is not None:
                scale = job.height / height
            else:
                scale = min(1.0, MAX_SIZE / max(width, height))
                if scale < 1:
                    warnings.append(
                        f"the init image is {width}x{height}: sampled scaled down to fit {MAX_SIZE}"
                    )

            def side(pixels: int) -> int:
                return min(MAX_SIZE, max(MIN_SIZE, int(pixels * scale) // multiple * multiple))

            job.width, job.height = job.width or side(width), job.height or side(height)
        if job.strength is None:
            job.strength = DEFAULT_STRENGTH
        assert job.steps is not None
        if int(job.steps * job.strength) < 1:
            raise JobRejected(
                f"{job.steps} steps at strength {job.strength:g} run int({job.steps} x {job.strength:g}) = 0 steps",
                field=f"{where}strength",
                allowed=f"a strength of at least {1 / job.steps:.3g} at {job.steps} steps, or more steps",
            )

    def _controlnet(self, spec, model: ModelRef, where: str) -> ControlNetInfo:
        info = self._add_on(
            self.controlnets, ControlNetError, "ControlNet", spec.model, model, f"{where}.model"
        )
        _control_family(info, model, f"{where}.model")
        spec.model = info.name
        spec.image, _ = self.stored(spec.image, f"{where}.image")
        return info

    @staticmethod
    def _t2i_adapters(job: GenerationJob, model: ModelRef, infos: list[ControlNetInfo], where: str) -> None:
        """A job's T2I-Adapters, as diffusers' adapter pipelines take them: text to image only, no
        ControlNet beside them, from the first step; on SDXL until ``end`` (one for all), on SD
        1.x and 2.x on every step; made for the model (its family; its UNet's widths where they
        can be read here); the image a multiple of their unshuffle factor."""
        first = next(info for info in infos if info.adapter is not None)
        assert first.adapter is not None
        if job.init_image is not None:
            raise JobRejected(
                f"T2I-Adapter {first.name!r} steers text to image only: diffusers has no image-to-image or "
                "inpainting pipeline with T2I-Adapters",
                field=f"{where}init_image",
                allowed="no init_image with a T2I-Adapter (a ControlNet runs on an init image)",
            )
        if job.ip_adapter is not None and not first.adapter.for_sdxl:
            raise JobRejected(
                f"T2I-Adapter {first.name!r} is for SD 1.x and 2.x, whose adapter pipeline in diffusers "
                "takes no IP-Adapter",
                field=f"{where}ip_adapter",
                allowed="no ip_adapter beside an SD 1.x or 2.x T2I-Adapter (on SDXL both run)",
            )
        sdxl = model.family is Family.sdxl if model.family is not None else None
        widths = unet_widths(model)
        for n, (spec, info) in enumerate(zip(job.controlnets, infos)):
            unit = f"{where}controlnets[{n}]"
            if info.adapter is None:
                raise JobRejected(
                    f"ControlNet {info.name!r} and T2I-Adapter {first.name!r} in one job: diffusers has no "
                    "pipeline that runs both",
                    field=f"{unit}.model",
                    allowed="only ControlNets or only T2I-Adapters in one job",
                )
            reason = misfit(info.adapter, sdxl, widths)
            if reason is not None:
                raise JobRejected(
                    f"T2I-Adapter {info.name!r} does not fit model {model.key!r}: {reason}",
                    field=f"{unit}.model",
                    allowed="a T2I-Adapter made for the model",
                )
            if info.adapter.total_downscale != first.adapter.total_downscale:
                raise JobRejected(
                    f"T2I-Adapters {first.name!r} and {info.name!r} scale the map down differently "
                    "(a light adapter and a full one): diffusers' MultiAdapter adds maps of one size",
                    field=f"{unit}.model",
                    allowed=f"T2I-Adapters of {first.name!r}'s kind ({first.adapter.adapter_type})",
                )
            if spec.start != 0:
                raise JobRejected(
                    "a T2I-Adapter acts from the first step: diffusers' adapter pipelines have no start",
                    field=f"{unit}.start",
                    allowed="start 0",
                )
            if not info.adapter.for_sdxl and spec.end != 1:
                raise JobRejected(
                    "on SD 1.x and 2.x a T2I-Adapter acts on every step: diffusers' adapter pipeline has no end",
                    field=f"{unit}.end",
                    allowed="end 1 (on SDXL, end is the share of the steps it acts on)",
                )
            if spec.end != job.controlnets[0].end:
                raise JobRejected(
                    "one job's T2I-Adapters act over the same steps on SDXL (diffusers' "
                    "adapter_conditioning_factor is one number)",
                    field=f"{unit}.end",
                    allowed=f"end {job.controlnets[0].end:g}, as controlnets[0]'s",
                )
        factor = first.adapter.downscale_factor
        for side in ("width", "height"):
            if (size := getattr(job, side)) is not None and size % factor:
                raise JobRejected(
                    f"T2I-Adapter {first.name!r} unshuffles the image by {factor}: a {side} of {size} does not divide",
                    field=f"{where}{side}",
                    allowed=f"a {side} that is a multiple of {factor}",
                )

    def _ip_adapter(self, spec, model: ModelRef, where: str) -> None:
        self._add_on(self.ip_adapters, IpAdapterError, "IP-Adapter", spec.model, model, f"{where}.model")
        spec.images = [self.stored(image, f"{where}.images[{n}]")[0] for n, image in enumerate(spec.images)]

    @staticmethod
    def _add_on(catalog, error: type[Exception], noun: str, name: str, model: ModelRef, field: str):
        """A ControlNet's or IP-Adapter's description, refused unless it is made for the width of
        the model's text embedding (its cross-attention)."""
        if catalog is None:
            raise JobRejected(f"this submitter has no {noun} folder", field=field)
        try:
            info = catalog.get(name)
        except error as exc:
            raise JobRejected.of(exc, field) from None
        width, wanted = info.cross_attention_dim, model.cross_attention_dim
        if width is not None and wanted is not None and width != wanted:
            raise JobRejected(
                f"{noun} {info.name!r} is made for a {width}-wide text embedding but model {model.key!r} "
                f"reads {wanted}: it is made for another model family",
                field=field,
                allowed=f"{'an' if noun[0] in 'AEIOU' else 'a'} {noun} of the model's family ({wanted} wide)",
            )
        return info

    def stored(self, ref: str, field: str) -> tuple[str, tuple[int, int]]:
        """The image's stored name and size; an http(s) URL is fetched and stored first."""
        if self._images is None:
            raise JobRejected("this submitter has no object store to read input images from", field=field)
        if ref.startswith(("http://", "https://")):
            known, when = self._urls.get(ref, ("", -URL_KEPT_SECONDS * 2))
            if time.monotonic() - when > URL_KEPT_SECONDS:  # a batch naming one URL fetches it once
                checked = self._images().put(fetch_image(ref, field, self.url_hosts), field)
                known = checked.ref
                if len(self._urls) > 1024:  # a long-lived API process: forget the old ones
                    self._urls.clear()
                self._urls[ref] = (known, time.monotonic())
                self._sizes[known] = (checked.width, checked.height)
            ref = known
        size = self._sizes.get(ref)
        if size is None:
            size = self._sizes[ref] = self._images().size(ref, field)
        return ref, size


def _control_family(info: ControlNetInfo, model: ModelRef, field: str) -> None:
    """A FLUX.1 ControlNet runs on FLUX.1 models of its transformer's width, SD's on SD's."""
    if model.family is None:  # a model submit cannot read: the worker checks it
        return
    label = model.family.traits.label
    if info.family is None and model.family.is_flow:
        raise JobRejected(
            f"{info.noun} {info.name!r} is for SD 1.x, SD 2.x or SDXL but model {model.key!r} is {label}",
            field=field,
            allowed="a FLUX.1 ControlNet (a diffusers FluxControlNetModel folder) on a FLUX.1 model",
        )
    if info.family is not None and info.family != model.family.value:
        raise JobRejected(
            f"ControlNet {info.name!r} is for FLUX.1 but model {model.key!r} is {label}",
            field=field,
            allowed="a ControlNet of the model's family",
        )
    width, wanted = info.transformer_width, model.transformer_width
    if width is not None and wanted is not None and width != wanted:
        raise JobRejected(
            f"ControlNet {info.name!r} is {width} wide but model {model.key!r}'s transformer is {wanted}",
            field=field,
            allowed=f"a FLUX.1 ControlNet made for the model ({wanted} wide)",
        )
