"""The store stage, the half of JobRunner that stores: a job's images are encoded as PNGs
with their generation parameters, uploaded (riding out a store outage), and the job's
record ends succeeded; in background threads (``STORE_THREADS``) while the next call samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import NamedTuple

from lorafleet.common.catalog.embeddings import EmbeddingInfo
from lorafleet.common.catalog.vaes import VaeInfo
from lorafleet.common.infra.retry import with_retries
from lorafleet.common.infra.storage import image_key
from lorafleet.common.schema.errors import InvalidInput, JobFailed, Superseded, TransientError
from lorafleet.common.schema.jobs import ImageRef, JobStatus, Progress
from lorafleet.worker.lora.files import fetch_object
from lorafleet.worker.outputs import encode_png, parameters_text, sha256_bytes
from lorafleet.worker.run.batching import Member
from lorafleet.worker.run.sampling import image_seed

logger = logging.getLogger(__name__)

STORE_THREADS = 2
"""Threads that encode and upload finished jobs' images while the next call samples."""


class StoreContext(NamedTuple):
    """What every image of a group carries in its parameters besides its job's own values."""

    infos: list
    model_hash: str | None
    vae: VaeInfo | None
    embeddings: list
    modules: tuple[str, ...] = ()
    """The base a transformer-only checkpoint runs on (Forge's ``Module 1: ...``)."""
    controlnets: tuple = ()
    """The job's ControlNets (ControlNetInfo), as A1111 names them in ``ControlNet N``."""
    ip_adapter: object = None
    """The job's IP-Adapter (IpAdapterInfo)."""


class StoreStage:
    """Mixed into JobRunner (worker/run/runner.py): its storing half. Uses the runner's
    settings, storage, disk cache, stats and record moves."""

    def _store(self, member: Member, context: StoreContext, started: float) -> JobStatus | None:
        """Encode and upload a job's images, then end its record (in the store stage)."""
        job, timings = member.job, member.timings
        tick = time.perf_counter()
        try:
            # each PNG names the rows of its call (Batch size): with them it regenerates exactly
            refs = [
                self._store_image(
                    job.model_copy(update={"batch_size": member.rows[index]}),
                    index,
                    member.images[index],
                    *context,
                )
                for index in range(job.num_images)
            ]
            timings.upload = time.perf_counter() - tick
            timings.total = time.perf_counter() - started
            timings.batch_size = max(member.rows.values())
            self.finish(
                member.job_id,
                JobStatus.succeeded,
                images=refs,
                timings=timings,
                warnings=member.warnings,
                progress=Progress(step=member.record.progress.total, total=member.record.progress.total),
            )
            self.stats.done += 1
        except Superseded as exc:
            logger.warning("%s; this run stops without writing it", exc)
            return None
        except TransientError as exc:
            message, again = exc.message, True
        except (InvalidInput, JobFailed) as exc:
            message, again = exc.message, False
        else:
            logger.info("job %s succeeded: %d images in %.2f s", member.job_id, len(refs), timings.total)
            return JobStatus.succeeded
        try:  # its images not all stored: the job runs again or fails, if this run still owns it
            if again:
                return self._again_or_fail(member.record, message, timings, member.warnings)
            return self._fail(member.job_id, message, timings, member.warnings)
        except Superseded as exc:
            logger.warning("%s; this run stops without writing it", exc)
            return None

    def _local(self, info: EmbeddingInfo | VaeInfo) -> EmbeddingInfo | VaeInfo:
        """An embedding or VAE with a file on this worker: fetched from the store when it is
        known only from the shared registry (checked by sha256, kept in the disk cache)."""
        if info.path is not None or info.object_key is None:
            return info
        path = fetch_object(self.storage, self.disk, repr(info.name), info.object_key, info.sha256)
        return replace(info, path=path)

    def _store_image(
        self,
        job,
        index: int,
        image,
        infos,
        model_hash: str | None,
        vae: VaeInfo | None,
        embeddings: list,
        modules: tuple[str, ...] = (),
        controlnets: tuple = (),
        ip_adapter=None,
    ) -> ImageRef:
        seed = image_seed(job, index)
        text = parameters_text(
            job, seed, infos, model_hash, vae, embeddings, modules, controlnets, ip_adapter
        )
        data = encode_png(image, text)
        key = image_key(job.output_prefix, job.batch_id, job.job_id, index)
        uri = self._upload(key, data)
        logger.info("job %s image %d uploaded to %s", job.job_id, index, uri)
        return ImageRef(
            uri=uri,
            key=key,
            size=len(data),
            sha256=sha256_bytes(data),
            width=image.width,
            height=image.height,
            seed=seed,
        )

    def _upload(self, key: str, data: bytes) -> str:
        """Store one PNG, riding out a store outage for ``upload_attempts`` tries."""
        attempts = self.settings.upload_attempts
        try:
            return with_retries(
                f"upload of {key}", lambda: self.storage.put(key, data, "image/png"), attempts
            )
        except TransientError as exc:
            raise TransientError(f"upload of {key} failed {attempts} times, last: {exc.message}") from exc
