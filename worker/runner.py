"""One job, end to end, on a worker: the logic behind the Celery task.

    record queued/running -> running (attempt n)
    hot pipeline -> LoRA stack -> patch -> sample (progress, cancel) -> restore
    PNGs with parameters -> storage (retried with backoff) -> record succeeded

Every way out ends the record: succeeded, failed with a message a person can act on, or
cancelled, except one: a TransientError (the store or the broker unavailable after the
tries where it happened) puts the job back to queued, and the task sends it again after
``requeue_delay`` seconds, until it has run ``job_attempts`` times; then it fails. Weights
are restored from the pristine copies after every job, whatever happened, before the
worker takes the next one.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import redis
import torch

from lorafleet.common.embeddings import EmbeddingCatalog, EmbeddingInfo
from lorafleet.common.errors import InvalidInput, JobCancelled, JobFailed, Superseded, TransientError
from lorafleet.common.jobs import ImageRef, JobRecord, JobStatus, Progress, Timings, utcnow
from lorafleet.common.metrics import record_finished
from lorafleet.common.models import ModelRegistry
from lorafleet.common.retry import with_retries
from lorafleet.common.settings import Settings
from lorafleet.common.shared_files import SharedFiles
from lorafleet.common.state import JobStore
from lorafleet.common.storage import Storage, image_key
from lorafleet.common.vaes import VaeInfo
from lorafleet.common.workers import WorkerRegistry
from lorafleet.worker.embeddings import applied
from lorafleet.worker.lora_files import DiskCache, fetch_object
from lorafleet.worker.loras import LoraStore
from lorafleet.worker.outputs import encode_png, parameters_text, sha256_bytes
from lorafleet.worker.pipelines import HotPipeline, PipelineCache
from lorafleet.worker.sampling import image_seed, sample
from lorafleet.worker.vaes import VaeCache

logger = logging.getLogger(__name__)

RUN_AGAIN_DELAY = 5.0
"""Seconds before a job that met a transient failure runs again; doubled for each run."""
RUN_AGAIN_MAX_DELAY = 120.0
REDIS_OUTAGE_TRIES = 12
"""Tries of a job's final record write through a Redis outage (backoff 1, 2, 4 ... 30 s: about
3.5 minutes) before the message goes back to its queue."""

T = TypeVar("T")


@dataclass
class WorkerStats:
    """Counters a worker reports about itself."""

    done: int = 0
    failed: int = 0
    cancelled: int = 0
    lora_hits: int = 0
    lora_misses: int = 0
    current_job: str | None = None
    current_step: int = 0
    current_total: int = 0
    switch_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=100))


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


def _allocator_message(exc: BaseException) -> str:
    """The useful part of an allocator's complaint (torch's CPU one wraps it in noise)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if match := re.search(r"tried to allocate (\d+) bytes", text):
        return f"could not allocate {int(match.group(1)) / 2**20:.0f} MiB more"
    return text


class JobRunner:
    """Runs jobs on this worker's hot pipelines."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        pipelines: PipelineCache,
        loras: LoraStore,
        *,
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.pipelines = pipelines
        self.loras = loras
        self.vaes = VaeCache(pipelines.device, pipelines.dtype)
        self.embeddings = EmbeddingCatalog(settings.embedding_dir, SharedFiles(store.redis, "embedding"))
        # Registered embeddings and VAEs are fetched into the LoRA files' disk cache (by sha256).
        self.disk = loras.files.cache or DiskCache(
            settings.lora_disk_cache_folder, settings.lora_disk_cache_mb * 1024 * 1024
        )
        self.models = ModelRegistry(settings, store.redis)
        self.worker_name = worker_name
        self.instance = uuid.uuid4().hex
        """This process's id in its heartbeat and in the records of the jobs it runs."""
        self.workers = WorkerRegistry(store.redis)
        self._run_id: str | None = None
        self._redis_away = False
        self.served: frozenset[str] | None = None
        """Model keys this worker serves (its queues'); None: any (tests, benchmarks)."""
        self.stats = WorkerStats()
        self.requeue_delay = RUN_AGAIN_DELAY
        """Seconds the task waits before sending a job that was queued again."""

    # ------------------------------------------------------------------ record moves
    def _start(self, job_id: str) -> tuple[JobStatus | None, JobRecord | None]:
        """Take the job in one transaction: (its status before, the record after).

        A job already ended is left alone; one cancelled while queued ends cancelled; one
        that started ``job_attempts`` times without finishing ends failed; any other starts here.
        """
        before: list[JobStatus] = []
        run_id = uuid.uuid4().hex

        def change(record: JobRecord) -> JobRecord | None:
            before.append(record.status)
            if record.status.final:
                return None
            if record.status is JobStatus.running and self.workers.owner_alive(
                record.worker, record.worker_instance, self.settings.worker_lost_after
            ):
                return None  # a second delivery while its worker runs it: dropped
            if record.cancel_requested:
                record.status, record.finished_at = JobStatus.cancelled, utcnow()
                record.error = "cancelled before it ran"
                return record
            if record.attempts >= self.settings.job_attempts:
                record.status, record.finished_at = JobStatus.failed, utcnow()
                record.error = (
                    f"started {record.attempts} times without finishing (the worker running it was lost: "
                    "killed or out of memory); not retried again"
                )
                return record
            if record.status is JobStatus.running:  # its worker was lost; this run takes it over
                record.warnings = [
                    *record.warnings,
                    f"worker {record.worker} was lost (no heartbeat for {self.settings.worker_lost_after} s) "
                    f"during run {record.attempts}; run {record.attempts + 1} on {self.worker_name} took the job over",
                ]
            record.status = JobStatus.running
            record.attempts += 1
            record.started_at = utcnow()
            record.worker, record.worker_instance, record.run_id = self.worker_name, self.instance, run_id
            record.progress = Progress(step=0, total=(record.job.steps or 0) * record.job.num_images)
            record.timings = Timings(queue_wait=(record.started_at - record.submitted_at).total_seconds())
            return record

        record = self.store.update(job_id, change)
        if record is not None and record.run_id == run_id:
            self._run_id = run_id
        return (before[-1] if before else None), record

    def _owned(self, record: JobRecord) -> None:
        """Superseded unless this run still owns the record (the fencing check of every
        write a run makes, inside the same compare-and-set)."""
        if self._run_id is not None and record.run_id != self._run_id:
            raise Superseded(
                f"run {self._run_id[:8]} of this worker no longer owns the job (now "
                f"{record.status.value}, run {str(record.run_id)[:8]} on {record.worker})",
                job_id=record.job_id,
            )

    def finish(self, job_id: str, status: JobStatus, **fields) -> JobRecord | None:
        """End the record in ``status`` (setting ``fields``) and count it in the fleet's stats."""

        def change(record: JobRecord) -> JobRecord:
            self._owned(record)
            record.status = status
            record.finished_at = utcnow()
            for name, value in fields.items():
                setattr(record, name, value)
            return record

        record = self._through_outage(
            f"the record of job {job_id}", lambda: self.store.update(job_id, change)
        )
        if record is not None:
            record_finished(self.store.redis, record)
        return record

    def _progress(self, job_id: str, step: int) -> None:
        def change(record: JobRecord) -> JobRecord:
            self._owned(record)
            record.progress.step = step
            return record

        self.stats.current_step = step
        try:
            record = self.store.update(job_id, change)
        except redis.RedisError as exc:  # Redis away: sampling goes on, progress waits for it
            if not self._redis_away:
                logger.warning(
                    "job %s: progress not written (Redis unavailable: %s); sampling goes on", job_id, exc
                )
            self._redis_away = True
            return
        if self._redis_away:
            logger.info("job %s: Redis is back; progress written again", job_id)
            self._redis_away = False
        if record is None or record.cancel_requested or record.status is JobStatus.cancelled:
            raise JobCancelled("cancelled while running", job_id=job_id)

    def _through_outage(self, what: str, write: Callable[[], T]) -> T:
        """``write()``, waited through a Redis outage of up to a few minutes (the images are
        stored; only the record is left to write), then the RedisError itself."""

        def attempt() -> T:
            try:
                return write()
            except redis.RedisError as exc:
                raise TransientError(f"Redis unavailable: {exc}") from exc

        try:
            return with_retries(what, attempt, REDIS_OUTAGE_TRIES)
        except TransientError as exc:
            raise exc.__cause__ or exc from None

    # ------------------------------------------------------------------ the job
    def run(self, job_id: str) -> JobStatus | None:
        """Run one job to its end; returns its final status (None if it was not ours to run,
        or another run took it over while this one ran)."""
        self._run_id = None
        before, record = self._start(job_id)
        if record is None:
            logger.warning("job %s has no record (expired or never queued); dropped", job_id)
            return None
        if before is not None and before.final:
            logger.info("job %s is already %s; skipped", job_id, before.value)
            return record.status
        if record.status is JobStatus.running and record.run_id != self._run_id:
            logger.info(
                "job %s is running on %s (alive): this second delivery is dropped", job_id, record.worker
            )
            return None
        if record.status is not JobStatus.running:
            record_finished(self.store.redis, record)
            logger.info("job %s ended %s before it ran: %s", job_id, record.status.value, record.error)
            return record.status
        logger.info("job %s started (attempt %d) on %s", job_id, record.attempts, self.worker_name)
        self.stats.current_job, self.stats.current_step = job_id, 0
        self.stats.current_total = record.progress.total
        try:
            return self.execute(record)
        except Superseded as exc:
            logger.warning("%s; this run stops without writing it", exc)
            return None
        finally:
            self.stats.current_job = None
            self._run_id = None
            self.disk.release()  # the job's cached files: other workers may evict them now

    def execute(self, record: JobRecord) -> JobStatus:
        """Everything between taking a running job and its final record: pipeline, LoRAs,
        sampling, storage. A subclass may replace it to measure the queue alone
        (bench/queue_overhead.py); it must end the record with ``finish``."""
        job_id, job = record.job_id, record.job
        timings = record.timings
        warnings = list(record.warnings)
        started = time.perf_counter()
        if self.served is not None and job.model not in self.served:
            return self._fail(
                job_id,
                f"worker {self.worker_name} serves {', '.join(sorted(self.served))}, not {job.model!r}: "
                "the job reached a queue that is not its model's",
                timings,
                warnings,
            )
        try:
            model = self.models.get(job.model)
            hot, timings.pipeline_load = self.pipelines.get(model)
            with self.pipelines.using(hot):
                try:
                    refs = self._generate(record, hot, timings, warnings)
                except BaseException:
                    self._restore(hot)
                    raise
        except Superseded:
            raise
        except JobCancelled:
            self.stats.cancelled += 1
            self.finish(
                job_id,
                JobStatus.cancelled,
                error="cancelled while running",
                timings=timings,
                warnings=warnings,
            )
            logger.info("job %s cancelled while running", job_id)
            return JobStatus.cancelled
        except TransientError as exc:
            return self._again_or_fail(record, exc.message, timings, warnings)
        except (InvalidInput, JobFailed) as exc:
            return self._fail(job_id, exc.message, timings, warnings)
        except Exception as exc:
            if _is_out_of_memory(exc):
                message = (
                    f"out of memory on {self.pipelines.device} for {job.num_images} image(s) of "
                    f"{job.width}x{job.height}: {_allocator_message(exc)} — "
                    "ask for fewer or smaller images, or run fewer models per worker"
                )
            else:
                logger.exception("job %s: unexpected error", job_id)
                message = f"internal error: {type(exc).__name__}: {exc}"
            return self._fail(job_id, message, timings, warnings)
        timings.total = time.perf_counter() - started
        self.finish(
            job_id,
            JobStatus.succeeded,
            images=refs,
            timings=timings,
            warnings=warnings,
            progress=Progress(step=record.progress.total, total=record.progress.total),
        )
        self.stats.done += 1
        logger.info("job %s succeeded: %d images in %.2f s", job_id, len(refs), timings.total)
        return JobStatus.succeeded

    def _generate(
        self, record: JobRecord, hot: HotPipeline, timings: Timings, warnings: list[str]
    ) -> list[ImageRef]:
        """Stack, patch, sample, restore, store: the images of one job on a pinned pipeline."""
        job_id, job = record.job_id, record.job
        stack = self.loras.stack(hot.model.key, hot.patcher, job.loras)
        timings.lora_load = stack.seconds
        timings.lora_hits, timings.lora_misses = stack.hits, stack.misses
        self.stats.lora_hits += stack.hits
        self.stats.lora_misses += stack.misses
        warnings.extend(stack.warnings)
        patch = hot.patcher.apply(stack.entries)
        timings.lora_apply = patch.apply
        tick = time.perf_counter()
        vae = self._local(self.models.vaes.get(job.vae)) if job.vae else None
        embeddings = [self._local(self.embeddings.get(name)) for name in job.embeddings]
        with self.vaes.swapped(hot, vae), applied(hot, embeddings):
            images = sample(hot.pipe, hot.scheduler_config, job, lambda step: self._progress(job_id, step))
        timings.sampling = time.perf_counter() - tick
        restored = hot.patcher.restore()
        timings.restore = patch.restore + restored.restore
        self.stats.switch_seconds.append(patch.apply + timings.restore)
        tick = time.perf_counter()
        refs = [
            self._store_image(job, index, image, stack.infos, hot.model_hash, vae, embeddings)
            for index, image in enumerate(images)
        ]
        timings.upload = time.perf_counter() - tick
        return refs

    def _local(self, info: EmbeddingInfo | VaeInfo) -> EmbeddingInfo | VaeInfo:
        """An embedding or VAE with a file on this worker: fetched from the store when it is
        known only from the shared registry (checked by sha256, kept in the disk cache)."""
        if info.path is not None or info.object_key is None:
            return info
        path = fetch_object(self.storage, self.disk, repr(info.name), info.object_key, info.sha256)
        return replace(info, path=path)

    def _restore(self, hot: HotPipeline) -> None:
        hot.patcher.restore()
        if self.pipelines.device.type == "cuda":
            torch.cuda.empty_cache()

    def _again_or_fail(
        self, record: JobRecord, message: str, timings: Timings, warnings: list[str]
    ) -> JobStatus:
        """A transient failure: queue the job again (the task sends it after a delay), or fail
        it once it has run ``job_attempts`` times."""
        attempts = record.attempts
        if attempts >= self.settings.job_attempts:
            return self._fail(record.job_id, f"{message} (after {attempts} runs)", timings, warnings)
        self.requeue_delay = min(RUN_AGAIN_DELAY * 2 ** (attempts - 1), RUN_AGAIN_MAX_DELAY)
        note = f"run {attempts} of at most {self.settings.job_attempts} met a transient failure: {message}"

        def change(current: JobRecord) -> JobRecord | None:
            self._owned(current)
            if current.status is not JobStatus.running:
                return None
            if current.cancel_requested:  # it ran, and was cancelled meanwhile: it ends so
                current.status, current.finished_at = JobStatus.cancelled, utcnow()
                current.error = f"cancelled while running (the run had met a transient failure: {message})"
                current.timings, current.warnings = timings, warnings
                return current
            current.status = JobStatus.queued
            current.progress = Progress(step=0, total=current.progress.total)
            current.timings = timings
            current.warnings = [*warnings, f"{note}; it runs again in {self.requeue_delay:g} s"]
            return current

        after = self._through_outage(
            f"the record of job {record.job_id}", lambda: self.store.update(record.job_id, change)
        )
        if after is not None and after.status is JobStatus.cancelled:
            self.stats.cancelled += 1
            record_finished(self.store.redis, after)
            logger.info("job %s cancelled while running", record.job_id)
            return JobStatus.cancelled
        logger.warning("job %s: %s; queued again in %.0f s", record.job_id, note, self.requeue_delay)
        return JobStatus.queued

    def _fail(self, job_id: str, message: str, timings: Timings, warnings: list[str]) -> JobStatus:
        self.stats.failed += 1
        self.finish(job_id, JobStatus.failed, error=message, timings=timings, warnings=warnings)
        logger.info("job %s failed: %s", job_id, message)
        return JobStatus.failed

    # ------------------------------------------------------------------ images
    def _store_image(
        self, job, index: int, image, infos, model_hash: str | None, vae: VaeInfo | None, embeddings: list
    ) -> ImageRef:
        seed = image_seed(job, index)
        data = encode_png(image, parameters_text(job, seed, infos, model_hash, vae, embeddings))
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
