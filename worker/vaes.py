"""Separate VAEs on a worker: loaded once per (model, VAE file), swapped in for a job's decode.

A job that names a VAE decodes with it: the hot pipeline's own VAE is set aside for the job
and put back afterwards, whatever happened, so the next job decodes as before. A
single-file VAE is read with diffusers' single-file loader on the configs of the model's own
VAE (its scaling factor included); a diffusers VAE folder carries its own config. A few
loaded VAEs are kept (LRU), on the pipeline's device and dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lorafleet.common.catalog.vaes import VaeInfo
from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.lru import LRUCache
from lorafleet.worker.pipelines import HotPipeline

logger = logging.getLogger(__name__)

KEPT = 2
"""Loaded VAEs a worker keeps (an SD VAE is about 160 MB in float16)."""


class VaeCache:
    """Loaded VAEs by (model key, VAE hash)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = KEPT) -> None:
        self.device = device
        self.dtype = dtype
        self._loaded: LRUCache[tuple[str, str], torch.nn.Module] = LRUCache(max_items=capacity)

    def get(self, info: VaeInfo, hot: HotPipeline) -> torch.nn.Module:
        key = (hot.model.key, info.short_hash)
        vae = self._loaded.get(key)
        if vae is None:
            vae = self._load(info, hot)
            self._loaded.put(key, vae)
            logger.info("VAE %s (%s) loaded for %s", info.name, info.short_hash, hot.model.key)
        return vae

    def _load(self, info: VaeInfo, hot: HotPipeline) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        model = hot.model
        try:
            if info.single_file:
                config = model.config if model.single_file else model.source
                local = Path(str(config)).is_absolute()
                vae = AutoencoderKL.from_single_file(
                    str(info.weights),
                    config=config,
                    subfolder="vae",
                    local_files_only=local,
                    torch_dtype=self.dtype,
                )
            else:
                vae = AutoencoderKL.from_pretrained(
                    str(info.path), torch_dtype=self.dtype, local_files_only=True
                )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobFailed(f"VAE {info.name!r} cannot be loaded for model {model.key!r}: {exc}") from exc
        return vae.to(self.device).eval()

    @contextmanager
    def swapped(self, hot: HotPipeline, info: VaeInfo | None) -> Iterator[None]:
        """The job's VAE in the pipeline for the block; the pipeline's own one after it."""
        if info is None:
            yield
            return
        vae = self.get(info, hot)
        original = hot.pipe.vae
        hot.pipe.vae = vae
        try:
            yield
        finally:
            hot.pipe.vae = original
