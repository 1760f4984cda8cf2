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
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import redis
import torch

from lorafleet.common.catalog.controlnets import ControlNetCatalog
from lorafleet.common.catalog.embeddings import EmbeddingCatalog
from lorafleet.common.catalog.ip_adapters import IpAdapterCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.catalog.shared_files import SharedFiles
from lorafleet.common.catalog.upscalers import UpscalerCatalog
from lorafleet.common.fleet.lifecycle import Lifecycle
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.retry import with_retries
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.errors import InvalidInput, JobCancelled, JobFailed, Superseded, TransientError
from lorafleet.common.schema.jobs import JobRecord, JobStatus, Timings
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.controlnets import ControlNetCache
from lorafleet.worker.lora.files import DiskCache
from lorafleet.worker.lora.store import LoraStore
from lorafleet.worker.pipelines import HotPipeline, PipelineCache
from lorafleet.worker.run.batching import BatchSizes, Member, batch_key
from lorafleet.worker.run.companions import WaitingJobs
from lorafleet.worker.run.group import GroupSampling, allocator_message, is_out_of_memory
from lorafleet.worker.run.inputs import InputReader
from lorafleet.worker.run.sampling import one_image_per_call
from lorafleet.worker.run.store_stage import STORE_THREADS, StoreContext, StoreStage
from lorafleet.worker.upscalers import UpscalerCache
from lorafleet.worker.vaes import VaeCache

logger = logging.getLogger(__name__)

RUN_AGAIN_DELAY = 5.0
"""Seconds before a job that met a transient failure runs again; doubled for each run."""
RUN_AGAIN_MAX_DELAY = 120.0
PROGRESS_SECONDS = 0.25
"""Least time between two progress writes of one job (the last step is always written)."""
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


def _result(future: Future) -> JobStatus | None:
    return future.result()


class JobRunner(GroupSampling, StoreStage):
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
        self.inputs = InputReader(storage)  # jobs' init images, masks and control maps
        self.controlnet_catalog = ControlNetCatalog(
            settings.controlnet_dir, SharedFiles(store.redis, "controlnet")
        )
        self.controlnet_models = ControlNetCache(pipelines.device, pipelines.dtype, pipelines=pipelines)
        self.ip_adapter_catalog = IpAdapterCatalog(settings.ip_adapter_dir)
        self.upscaler_catalog = UpscalerCatalog(settings.upscaler_dir, SharedFiles(store.redis, "upscaler"))
        self.upscaler_models = UpscalerCache(pipelines.device, pipelines=pipelines)
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
        self.lifecycle = Lifecycle(store)
        self._runs: dict[str, str] = {}
        self.waiting = WaitingJobs(store.redis)
        self.orphans: set[str] = set()
        """Jobs whose messages may be lost with a Redis failure mid-job (worker/tasks.py):
        upkeep lists them unsent once Redis is back (common/fleet/upkeep.py)."""
        self._taken: set[str] = set()
        """Jobs whose messages this run took from the queue: queued again, they need a new one."""
        """Job id -> the fencing token of this worker's run of it, for the jobs running now."""
        self._last_progress: dict[str, float] = {}
        self._totals: dict[str, int] = {}
        """Job id -> its progress total where the pipeline counts it otherwise than the start
        did (a flow family's image-to-image: worker/run/group.py); written with its progress."""
        self.batch_sizes = BatchSizes(settings.max_batch, pipelines.device)
        self._last_shape = ("", 512, 512)
        self._store_stage = (
            ThreadPoolExecutor(max_workers=STORE_THREADS, thread_name_prefix="lorafleet-store")
            if settings.background_stages
            else None
        )
        self._prefetch_stage = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-prefetch")
            if settings.background_stages
            else None
        )
        self._redis_away = False
        self.served: frozenset[str] | None = None
        """Model keys this worker serves (its queues'); None: any (tests, benchmarks)."""
        self.stats = WorkerStats()
        self.requeue_delay = RUN_AGAIN_DELAY
        """Seconds the task waits before sending a job that was queued again."""

    # ------------------------------------------------------------------ record moves
    def _start(self, job_id: str, queued: str | None = None) -> tuple[JobStatus | None, JobRecord | None]:
        """Take the job for a run of this worker (fleet/lifecycle.py ``start``; ``queued``: the
        message's hint of its record): (its status before, the record after)."""
        before, record, run_id = self.lifecycle.start(
            job_id,
            guess=queued,
            worker=self.worker_name,
            instance=self.instance,
            attempts_allowed=self.settings.job_attempts,
            owner_alive=lambda r: self.workers.owner_alive(
                r.worker, r.worker_instance, self.settings.worker_lost_after
            ),
            lost_after=self.settings.worker_lost_after,
        )
        if record is not None and record.run_id == run_id:
            self._runs[job_id] = run_id
        return before, record

    def finish(self, job_id: str, status: JobStatus, **fields) -> JobRecord | None:
        """End the record in ``status`` (setting ``fields``): its end's effects (stats, webhook,
        batch count) are written in the same step, through a Redis outage too."""
        run_id = self._runs.get(job_id)
        return self._through_outage(
            f"the record of job {job_id}", lambda: self.lifecycle.end(job_id, status, run_id, **fields)
        )

    def _progress(self, job_id: str, step: int, *, last: bool = False) -> None:
        """Write the job's progress (at most every PROGRESS_SECONDS, and at ``last``); raise
        JobCancelled if it was cancelled meanwhile."""
        if job_id == self.stats.current_job:
            self.stats.current_step = step
        now = time.monotonic()
        if not last and now - self._last_progress.get(job_id, 0.0) < PROGRESS_SECONDS:
            return
        self._last_progress[job_id] = now
        try:
            record = self.lifecycle.progress(job_id, self._runs.get(job_id), step, self._totals.get(job_id))
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
    def run(self, job_id: str, queued: str | None = None) -> JobStatus | None:
        """Run one job to its end, and with it the jobs waiting in its queue that can share its
        sampling calls (worker/run/companions.py); returns the job's final status (None if it was not
        ours to run, or another run took it over). ``queued``: the record as its message says
        it was queued, a hint for the start (fleet/lifecycle.py), never taken for the record."""
        self._runs = {}
        try:
            record, status = self._take(job_id, queued)
            if record is None:
                return status
            self.stats.current_job, self.stats.current_step = job_id, 0
            self.stats.current_total = record.progress.total
            group = [record, *self._companions(record)]
            if len(group) == 1:
                return self.execute(record)
            return self._execute_group(group)[job_id]
        except Superseded as exc:
            logger.warning("%s; this run stops without writing it", exc)
            return None
        finally:
            self.stats.current_job = None
            self._runs = {}
            self._taken = set()
            self._last_progress = {}
            self._totals = {}
            self.disk.release()  # the job's cached files: other workers may evict them now

    def _take(self, job_id: str, queued: str | None = None) -> tuple[JobRecord | None, JobStatus | None]:
        """Start the job: (its running record, None), or (None, what ``run`` returns) when it
        is not this worker's to run."""
        before, record = self._start(job_id, queued)
        if record is None:
            logger.warning("job %s has no record (expired or never queued); dropped", job_id)
            return None, None
        if before is not None and before.final:
            logger.info("job %s is already %s; skipped", job_id, before.value)
            return None, record.status
        if record.status is JobStatus.running and record.run_id != self._runs.get(job_id):
            logger.info(
                "job %s is running on %s (alive): this second delivery is dropped", job_id, record.worker
            )
            return None, None
        if record.status is not JobStatus.running:
            logger.info("job %s ended %s before it ran: %s", job_id, record.status.value, record.error)
            return None, record.status
        logger.info("job %s started (attempt %d) on %s", job_id, record.attempts, self.worker_name)
        return record, None

    def running_ids(self) -> set[str]:
        """The jobs this process runs now (read by its upkeep thread, for its abandoned runs)."""
        return set(self._runs.copy())  # a copy is one step: safe beside the job thread

    def batch_limit(self) -> int:
        """Images per call for the model and size of the last job (512x512 before any)."""
        return self.batch_sizes.get(*self._last_shape)

    def _companions(self, lead: JobRecord) -> list[JobRecord]:
        """Take and start the jobs waiting in the lead's queue that can share its calls:
        queued, with its batch key, while their images fit in the batch size."""
        job = lead.job
        assert job.width is not None and job.height is not None
        self._last_shape = (job.model, job.width, job.height)
        room = self.batch_sizes.rows(job) - job.num_images
        if room <= 0 or one_image_per_call(job):
            return []
        key = batch_key(job)
        waiting = [w for w in self.waiting.peek(lead.queue) if w.job_id != lead.job_id]
        records = dict(zip([w.job_id for w in waiting], self.store.get_many([w.job_id for w in waiting])))
        taken = []
        for candidate in waiting:
            record = records.get(candidate.job_id)
            if room <= 0:
                break
            if record is None or record.status is not JobStatus.queued or batch_key(record.job) != key:
                continue
            if record.job.num_images > room:
                continue
            # Listed unsent first: if this worker or Redis fails between taking the message and
            # starting the record, upkeep sends the still-queued job a new message.
            self.store.mark_unsent([candidate.job_id])
            if not self.waiting.take(candidate):
                self.store.sent([candidate.job_id])  # another worker has it
                continue
            self._taken.add(candidate.job_id)
            started, _ = self._take(candidate.job_id)
            self.store.sent([candidate.job_id])  # started (or ended): its record holds it now
            if started is not None:
                taken.append(started)
                room -= started.job.num_images
        if taken:
            logger.info("job %s samples with %d waiting jobs of the same batch key", lead.job_id, len(taken))
        return taken

    def execute(self, record: JobRecord) -> JobStatus | None:
        """Everything between taking a running job and its final record: pipeline, LoRAs,
        sampling, storage. A subclass may replace it to measure the queue alone
        (bench/queue_overhead.py); it must end the record with ``finish``."""
        return self._execute_group([record])[record.job_id]

    def _execute_group(self, records: list[JobRecord]) -> dict[str, JobStatus | None]:
        """Run jobs of one batch key together: one pipeline, one LoRA stack, shared sampling
        calls; each job is stored and ended on its own (its final status, by job id)."""
        started = time.perf_counter()
        members = [Member(record) for record in records]
        job = records[0].job
        statuses: dict[str, JobStatus | None] = {}
        stored: list[tuple[Member, Future | None]] = []
        if self.served is not None and job.model not in self.served:
            message = (
                f"worker {self.worker_name} serves {', '.join(sorted(self.served))}, not {job.model!r}: "
                "the job reached a queue that is not its model's"
            )
            return {m.job_id: self._fail(m.job_id, message, m.record.timings, m.warnings) for m in members}

        def store_when_done(member: Member, context: StoreContext) -> None:
            if self._store_stage is None:
                stored.append((member, None))
                statuses[member.job_id] = self._store(member, context, started)
            else:
                stored.append((member, self._store_stage.submit(self._store, member, context, started)))

        try:
            model = self.models.get(job.model)
            hot, load = self.pipelines.get(model)
            for member in members:
                member.record.timings.pipeline_load = load
            with self.pipelines.using(hot):
                try:
                    self._sample_group(members, hot, store_when_done)
                except BaseException:
                    self._restore(hot)
                    raise
        except Superseded:
            raise
        except TransientError as exc:
            self._end_unsampled(members, statuses, exc.message, transient=True)
        except (InvalidInput, JobFailed) as exc:
            self._end_unsampled(members, statuses, exc.message)
        except Exception as exc:
            if is_out_of_memory(exc):
                message = (
                    f"out of memory on {self.pipelines.device} for one {job.width}x{job.height} image "
                    f"(batches were halved down to 1): {allocator_message(exc)} — ask for smaller images, "
                    "or run fewer models per worker"
                )
            else:
                logger.exception("job %s: unexpected error", records[0].job_id)
                message = f"internal error: {type(exc).__name__}: {exc}"
            self._end_unsampled(members, statuses, message)
        finally:
            # every job ends (record, then ack) after its uploads: wait for each one, whatever
            # another raised, before this run's fencing tokens are let go (``run``)
            failures = []
            for member, future in stored:
                if future is None:
                    continue
                try:
                    statuses[member.job_id] = _result(future)
                except BaseException as exc:  # noqa: BLE001  (raised once all have ended)
                    failures.append(exc)
            if failures:
                raise failures[0]
        for member in members:
            if member.cancelled:
                statuses.setdefault(member.job_id, member.ended or JobStatus.cancelled)
        return statuses

    def _end_unsampled(
        self, members: list[Member], statuses: dict, message: str, transient: bool = False
    ) -> None:
        """Fail (or, ``transient``, queue again) every member whose images were not all
        sampled; the others are being stored and end by themselves."""
        for member in members:
            if member.job_id in statuses or member.cancelled or member.complete:
                continue
            try:
                if transient:
                    status = self._again_or_fail(member.record, message, member.timings, member.warnings)
                else:
                    status = self._fail(member.job_id, message, member.timings, member.warnings)
            except Superseded as exc:
                logger.warning("%s; this run stops without writing it", exc)
                status = None
            statuses[member.job_id] = status

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

        after = self._through_outage(
            f"the record of job {record.job_id}",
            lambda: self.lifecycle.requeue(
                record.job_id,
                self._runs.get(record.job_id),
                f"{note}; it runs again in {self.requeue_delay:g} s",
                message,
                timings,
                warnings,
            ),
        )
        if after is not None and after.status is JobStatus.cancelled:
            self.stats.cancelled += 1
            logger.info("job %s cancelled while running", record.job_id)
            return JobStatus.cancelled
        if record.job_id in self._taken:  # its message was taken from the queue: upkeep sends one
            self.store.mark_unsent([record.job_id])
        logger.warning("job %s: %s; queued again in %.0f s", record.job_id, note, self.requeue_delay)
        return JobStatus.queued

    def _fail(self, job_id: str, message: str, timings: Timings, warnings: list[str]) -> JobStatus:
        self.stats.failed += 1
        self.finish(job_id, JobStatus.failed, error=message, timings=timings, warnings=warnings)
        logger.info("job %s failed: %s", job_id, message)
        return JobStatus.failed

    # ------------------------------------------------------------------ images
