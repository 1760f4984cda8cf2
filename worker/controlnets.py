"""ControlNets on a worker: loaded once per file, kept a few at a time, handed to the job's call.

A diffusers ControlNet folder carries its own config; a single file is read with diffusers'
single-file loader (which takes the config of the matching published ControlNet from the
hub once, then its cache). Loaded on the pipeline's device and dtype; a few are kept (LRU),
their bytes counted in the hot pipelines' budget (worker/pipelines.py: an older one, then an
idle pipeline, makes room for one).
Several ControlNets of one job run as diffusers' ``MultiControlNetModel``. FLUX.1 ControlNets
(diffusers folders, ``family`` ``flux1``) load as ``FluxControlNetModel`` and run together as
``FluxMultiControlNetModel``; one made for another family than the hot pipeline's fails the job
(submit refuses it where it can read the model's family).

T2I-Adapters (entries of the same catalog) are kept here too: a diffusers folder with its
config, a single file built as the shape its tensors gave (common/catalog/t2i_adapters.py) and
loaded strictly; several of one job run as diffusers' ``MultiAdapter``. Whether they fit the
model (its family, its UNet's block widths) is checked once the pipeline is at hand, as a
submitter may not have seen the model's config.
"""

from __future__ import annotations

import logging

import torch

from lorafleet.common.catalog.controlnets import ControlNetInfo
from lorafleet.common.catalog.t2i_adapters import misfit
from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lru import LRUCache
from lorafleet.worker.pipelines import PipelineCache, weights_bytes

logger = logging.getLogger(__name__)

KEPT = 3
"""Loaded ControlNets a worker keeps: as many as a job may use (an SD 1.5 one is about 700 MB in float16)."""


class ControlNetCache:
    """Loaded ControlNets by sha256; with ``pipelines``, within the hot pipelines' budget."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = KEPT,
        pipelines: PipelineCache | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self._pipelines = pipelines
        self._loaded: LRUCache[str, torch.nn.Module] = (
            pipelines.add_on_cache(capacity) if pipelines is not None else LRUCache(max_items=capacity)
        )

    def get(self, info: ControlNetInfo) -> torch.nn.Module:
        model = self._loaded.get(info.sha256)
        if model is None:
            if self._pipelines is not None and info.weights is not None:
                self._pipelines.make_room_for(weights_bytes([info.weights], self.dtype))
            model = self._load(info)
            self._loaded.put(info.sha256, model)
            logger.info("%s %s (%s) loaded", info.noun, info.name, info.short_hash)
        return model

    def _load(self, info: ControlNetInfo) -> torch.nn.Module:
        from diffusers import ControlNetModel

        if info.adapter is not None:
            return self._load_adapter(info)

        try:
            if info.family is not None:  # FLUX.1: folders only (common/catalog/controlnets.py)
                from diffusers import FluxControlNetModel

                model = FluxControlNetModel.from_pretrained(
                    str(info.path), torch_dtype=self.dtype, local_files_only=True
                )
            elif info.single_file:
                model = ControlNetModel.from_single_file(str(info.weights), torch_dtype=self.dtype)
            else:
                model = ControlNetModel.from_pretrained(
                    str(info.path), torch_dtype=self.dtype, local_files_only=True
                )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobFailed(
                f"ControlNet {info.name!r} cannot be loaded ({type(exc).__name__}: {exc}); a diffusers ControlNet "
                "folder in autoimport/controlnet needs nothing else"
            ) from exc
        return model.to(self.device).eval()

    def _load_adapter(self, info: ControlNetInfo) -> torch.nn.Module:
        from diffusers import T2IAdapter
        from safetensors.torch import load_file

        assert info.adapter is not None
        try:
            if info.single_file:
                model = T2IAdapter(**info.adapter.config())
                model.load_state_dict(load_file(str(info.weights)))  # strict: every tensor, each shape
                model = model.to(self.dtype)
            else:
                model = T2IAdapter.from_pretrained(
                    str(info.path), torch_dtype=self.dtype, local_files_only=True
                )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobFailed(
                f"T2I-Adapter {info.name!r} cannot be loaded ({type(exc).__name__}: {exc})"
            ) from exc
        return model.to(self.device).eval()

    def for_job(self, infos: list[ControlNetInfo], pipe=None, model: str = "") -> torch.nn.Module | None:
        """The job's ControlNets (or T2I-Adapters, checked against ``pipe``, the hot pipeline of
        ``model``) as one module for its pipeline (None: it has none)."""
        if not infos:
            return None
        adapters = [info for info in infos if info.adapter is not None]
        if adapters:
            _check_adapters(infos, pipe, model)
        if pipe is not None:
            _check_family(infos, pipe, model)
        models = [self.get(info) for info in infos]
        if len(models) == 1:
            return models[0]
        if infos[0].family is not None:
            from diffusers import FluxMultiControlNetModel

            return FluxMultiControlNetModel(models)
        if adapters:
            from diffusers import MultiAdapter

            return MultiAdapter(models)
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        return MultiControlNetModel(models)


def _check_adapters(infos: list[ControlNetInfo], pipe, model: str) -> None:
    """JobFailed unless every unit is a T2I-Adapter that fits ``pipe`` (SDXL or not, its UNet's
    block widths): submit checks what it can see, and a model only workers see is seen here."""
    mixed = next((info for info in infos if info.adapter is None), None)
    if mixed is not None:
        raise JobFailed(
            f"ControlNet {mixed.name!r} and T2I-Adapters in one job: diffusers has no pipeline that runs both"
        )
    unet = getattr(pipe, "unet", None)
    sdxl = type(pipe).__name__.startswith("StableDiffusionXL") if pipe is not None else None
    widths = tuple(unet.config.block_out_channels) if unet is not None else None
    for info in infos:
        assert info.adapter is not None
        reason = misfit(info.adapter, sdxl, widths)
        if reason is not None:
            raise JobFailed(f"T2I-Adapter {info.name!r} does not fit model {model!r}: {reason}")


def _check_family(infos: list[ControlNetInfo], pipe, model: str) -> None:
    """JobFailed unless every ControlNet is made for ``pipe``'s family: FLUX.1 ones for
    ``FluxPipeline``, SD's for the UNet pipelines (a model submit could not read gets here)."""
    flux = type(pipe).__name__ == "FluxPipeline"
    unet = getattr(pipe, "unet", None) is not None
    for info in infos:
        if info.family is not None and not flux:
            raise JobFailed(
                f"ControlNet {info.name!r} is for FLUX.1 but model {model!r} is not; use a ControlNet of the "
                "model's family"
            )
        if info.family is None and not unet:
            raise JobFailed(
                f"{info.noun} {info.name!r} is for SD 1.x, SD 2.x or SDXL but model {model!r} is not; use a "
                "FLUX.1 ControlNet on a FLUX.1 model (ControlNets run on SD and FLUX.1 only)"
            )
