"""The Python SDK: submit jobs, watch them, cancel them.

    from lorafleet.producer import Client

    with Client() as client:
        handle = client.submit({"model": "tiny-sd15", "prompt": "a lighthouse",
                                "loras": [{"name": "watercolor", "weight": 0.8}]})
        record = handle.wait(timeout=60)
        print(record.status, [image.uri for image in record.images])

``Client`` is a thin face over its two halves: submitting (producer/submit.py: jobs,
batches, sweeps, retries) and following (producer/follow.py: records, waiting, events,
cancelling); here are what it holds (the broker, the records, the resolver) and the jobs
read from PNGs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lorafleet.common.catalog.controlnets import ControlNetCatalog
from lorafleet.common.catalog.input_images import InputImages
from lorafleet.common.catalog.input_retention import InputRetention, named_images
from lorafleet.common.catalog.ip_adapters import IpAdapterCatalog
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.catalog.shared_files import LoraRegistry, SharedFiles
from lorafleet.common.catalog.upscalers import UpscalerCatalog
from lorafleet.common.fleet.lifecycle import Lifecycle
from lorafleet.common.fleet.queue import make_celery
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.infra.storage import Storage, open_storage
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, parse_job
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.follow import Following
from lorafleet.producer.lora_imports import ImportedLora, import_lora
from lorafleet.producer.png_jobs import PngJob, PngReader
from lorafleet.producer.resolver import JobResolver
from lorafleet.producer.submit import Submitting

logger = logging.getLogger(__name__)


class Client(Submitting, Following):
    """Submits and follows jobs; one per process is plenty (it is thread-safe)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.broker = resolve_broker(self.settings)
        self.redis = self.broker.client()
        self.broker.check(self.redis)
        self.jobs = JobStore(self.redis, retention=self.settings.record_retention)
        self.lifecycle = Lifecycle(self.jobs)
        self.celery = make_celery(self.settings, self.broker)
        self._storage: Storage | None = None  # opened when a submitter names a job id
        self.resolver = JobResolver(
            ModelRegistry(self.settings, self.redis),
            LoraCatalog(self.settings.lora_dir, LoraRegistry(self.redis)),
            self.settings.lcm_loras,
            allow_paths=self.settings.allow_model_paths,
            allow_hub_ids=self.settings.allow_hub_ids,
            lora_mode=self.settings.lora_mode,
            images=self.input_images,
            controlnets=ControlNetCatalog(
                self.settings.controlnet_dir, SharedFiles(self.redis, "controlnet")
            ),
            ip_adapters=IpAdapterCatalog(self.settings.ip_adapter_dir),
            upscalers=UpscalerCatalog(self.settings.upscaler_dir, SharedFiles(self.redis, "upscaler")),
            url_hosts={h.strip() for h in (self.settings.api_import_hosts or "").split(",") if h.strip()},
        )
        self._images: InputImages | None = None

    # ------------------------------------------------------------------ jobs from images
    def job_from_png(self, path: str | os.PathLike, **overrides: Any) -> GenerationJob:
        """The job that regenerates the image at ``path`` (a PNG from lorafleet, A1111, Forge
        or InvokeAI), with ``overrides`` (job fields) in place of the image's values.

        Submitting it on the same model gives the same pixels for a lorafleet PNG. LoRAs,
        model and VAE are matched by name, then by hash; one not installed is refused
        (JobRejected names it). Parameters lorafleet does not reproduce are logged
        (``read_png`` returns them).
        """
        read = self.read_png(path, **overrides)
        for note in read.notes:
            logger.warning("%s", note)
        return parse_job(read.fields)

    def read_png(self, path: str | os.PathLike, **overrides: Any) -> PngJob:
        """The job fields of the image at ``path`` (not yet validated) and notes on what of it
        will not be reproduced; see ``job_from_png``."""
        return PngReader(self.resolver.models, self.resolver.loras).read(Path(path), overrides)

    # ------------------------------------------------------------------ images in
    def input_images(self) -> InputImages:
        """The object store's input images (opened on first use)."""
        if self._images is None:
            if self._storage is None:
                self._storage = open_storage(self.settings)
            retention = InputRetention(
                self.redis, self.settings.input_image_grace, self.settings.record_retention
            )
            self._images = InputImages(self._storage, self.settings.max_input_pixels, retention)
        return self._images

    def _keep_inputs(self, records: list[JobRecord]) -> None:
        """Keep the input images ``records`` name while the records are kept: written just
        before them (common/catalog/input_retention.py). JobRejected for one deleted since."""
        jobs = [record.job for record in records]
        if any(named_images(job) for job in jobs):
            self.input_images().keep_for(jobs)

    def upload_image(self, image: str | os.PathLike | bytes, field: str = "image") -> str:
        """Store an input image (a file's path or its bytes) for jobs to name as ``init_image``
        or ``mask_image``; returns its name, ``sha256:<hex>`` (the same bytes, the same name).
        JobRejected (naming ``field``) for what is not an image lorafleet takes."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return self.input_images().put(data, field).ref

    # ------------------------------------------------------------------ LoRAs
    def import_lora(
        self, source: str, *, name: str | None = None, sha256: str | None = None, force: bool = False
    ) -> ImportedLora:
        """Import a LoRA for the whole fleet from a file, a diffusers folder, an http(s) URL
        or a hub repo (see ``lora_sources``): checked, dropped into this machine's folder,
        stored by hash and registered on the broker. Returns what it did."""
        return import_lora(self.settings, source, self.redis, name=name, sha256=sha256, force=force)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
