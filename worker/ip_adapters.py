"""An IP-Adapter on a worker: loaded into the hot pipeline for one group of jobs, removed after.

diffusers' ``load_ip_adapter`` adds the adapter's image projection and its image-key/value
projections to every cross-attention of the UNet (new modules beside the model's weights,
which stay untouched) and its CLIP image encoder to the pipeline; ``unload_ip_adapter``
puts the plain attention back, whatever happened in between, so the next job samples as
before. The group's jobs share one image prompt (batching.batch_key), which diffusers
encodes once per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from lorafleet.common.catalog.ip_adapters import ENCODER, IpAdapterInfo
from lorafleet.common.schema.errors import JobFailed

logger = logging.getLogger(__name__)


@contextmanager
def ip_adapter_loaded(pipe, info: IpAdapterInfo | None, weight: float) -> Iterator[None]:
    """``info``'s IP-Adapter in ``pipe`` at ``weight`` for the block (None: nothing to do);
    after it, whatever happened, the pipeline's encoder, image processor and attention
    processors are the ones it had."""
    if info is None:
        yield
        return
    kept = {name: getattr(pipe, name, None) for name in ("image_encoder", "feature_extractor")}
    processors = dict(pipe.unet.attn_processors)
    try:
        try:
            pipe.load_ip_adapter(
                str(info.path),
                subfolder="",
                weight_name=info.weights_name,
                image_encoder_folder=ENCODER,
                local_files_only=True,
            )
        except Exception as exc:
            raise JobFailed(
                f"IP-Adapter {info.name!r} cannot be loaded ({type(exc).__name__}: {exc})"
            ) from exc
        logger.info("IP-Adapter %s (%s) loaded at %g", info.name, info.short_hash, weight)
        pipe.set_ip_adapter_scale(weight)
        yield
    finally:
        pipe.unload_ip_adapter()
        pipe.unet.set_attn_processor(processors)
        for name, value in kept.items():
            if hasattr(pipe, name):
                pipe.register_modules(**{name: value})
