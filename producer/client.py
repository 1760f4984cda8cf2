"""The Python SDK: submit jobs, watch them, cancel them.

    from lorafleet.producer import Client

    with Client() as client:
        handle = client.submit({"model": "tiny-sd15", "prompt": "a lighthouse",
                                "loras": [{"name": "watercolor", "weight": 0.8}]})
        record = handle.wait(timeout=60)
        print(record.status, [image.uri for image in record.images])

A submission is validated and resolved completely before anything is written: if one job
of a ``submit_many`` is refused, none is queued. A job's record is written (queued) before
its message is sent, so a worker never meets a job without a record; if the broker refuses
the send, the records of the jobs not sent are removed again and TransientError says so.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ValidationError

from lorafleet.common.catalog.lora_registry import LoraRegistry
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.events import BLOCK_SECONDS, JobEvent, read_events, tail
from lorafleet.common.fleet.lifecycle import Lifecycle
from lorafleet.common.fleet.queue import make_celery, queue_depths, send_job
from lorafleet.common.fleet.store import BATCH_INDEX_SLACK, JobStore
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.infra.storage import Storage, image_key, open_storage
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import BadArgument, InvalidInput, JobRejected, QueueFull, TransientError
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, JobStatus, parse_job
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.batches import watch_batch
from lorafleet.common.services.sweeps import SweepSpec, expand, save_layout
from lorafleet.common.services.webhooks import check_url
from lorafleet.producer.idempotency import IdempotencyKeys, fingerprint
from lorafleet.producer.lora_imports import ImportedLora, import_lora
from lorafleet.producer.png_jobs import PngJob, PngReader
from lorafleet.producer.resolver import JobResolver, new_id

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2
"""How often wait() reads the records."""

JobInput = GenerationJob | dict[str, Any]


def _plain(given: JobInput | SweepSpec) -> Any:
    """A job or sweep as plain JSON data, for a request's fingerprint."""
    return given.model_dump(mode="json", exclude_unset=True) if isinstance(given, BaseModel) else given


def _redis_full(exc: BaseException) -> bool:
    """Whether Redis refused a write for want of memory (its maxmemory reached)."""
    text = str(exc)
    return text.startswith("OOM") or "maxmemory" in text


def _full(exc: BaseException) -> QueueFull:
    return QueueFull(
        f"Redis is full ({exc}): nothing was queued; raise its maxmemory, or let finished records "
        "expire sooner (LORAFLEET_RECORD_RETENTION)"
    )


class JobHandle:
    """A submitted job: its ids, the warnings it was queued with, and ways to follow it."""

    def __init__(self, client: Client, record: JobRecord) -> None:
        self._client = client
        self.job_id = record.job_id
        self.batch_id = record.job.batch_id
        self.queue = record.queue
        self.job = record.job
        self.warnings = list(record.warnings)
        self.replayed = False
        """True when an idempotent submit answered with this job from an earlier request."""

    def record(self) -> JobRecord:
        return self._client.get(self.job_id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        return self._client.wait([self.job_id], timeout=timeout)[0]

    def cancel(self) -> JobRecord:
        return self._client.cancel(self.job_id)

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, batch={self.batch_id!r})"


def grouped_by_stack(records: Sequence[JobRecord]) -> list[JobRecord]:
    """The batch in send order: jobs with the same LoRA stack next to each other.

    Groups keep the order in which their first job was given, and jobs keep their order
    within a group, so a batch is reordered only as far as it saves stack switches; other
    batches are not held back (each batch is sent whole, in submit order).
    """
    groups: dict[tuple, list[JobRecord]] = {}
    for record in records:
        stack = tuple((s.name, s.sha256, s.weight, s.text_encoder_weight) for s in record.job.loras)
        groups.setdefault((record.job.model, stack), []).append(record)
    return [record for group in groups.values() for record in group]


class Client:
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
        )

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

    # ------------------------------------------------------------------ submit
    def submit(
        self,
        job: JobInput,
        *,
        batch_id: str | None = None,
        require_worker: bool = False,
        tenant: str | None = None,
    ) -> JobHandle:
        """Validate, resolve and queue one job."""
        return self.submit_many([job], batch_id=batch_id, require_worker=require_worker, tenant=tenant)[0]

    def submit_many(
        self,
        jobs: Iterable[JobInput],
        *,
        batch_id: str | None = None,
        require_worker: bool = False,
        tenant: str | None = None,
        idempotency_key: str | None = None,
        batch_webhook_url: str | None = None,
    ) -> list[JobHandle]:
        """Queue several jobs as one batch: all of them, or none if any is refused.

        A job whose model no live worker serves is queued with a warning (it runs when one
        starts); with ``require_worker`` the whole batch is refused instead. The batch is
        sent grouped by LoRA stack, so a worker switches stacks as rarely as it can.
        ``tenant``: the jobs are that tenant's (the API passes the caller's), counted against
        ``max_queued_per_tenant``; a batch of another tenant's is refused.
        ``idempotency_key``: a retry of the same request with the same key gets the jobs of
        the first (``replayed``), never new ones; another request with it is a
        DuplicateRequest (producer/idempotency.py).
        ``batch_webhook_url``: POSTed one signed event when every job of the batch has ended.
        """
        jobs = list(jobs)
        request = {
            "jobs": [_plain(job) for job in jobs],
            "batch_id": batch_id,
            "require_worker": require_worker,
            "batch_webhook_url": batch_webhook_url,
        }
        return self._once(
            idempotency_key,
            tenant,
            request,
            lambda: self._submit_many(jobs, batch_id, require_worker, tenant, batch_webhook_url),
        )

    def _once(
        self,
        idempotency_key: str | None,
        tenant: str | None,
        request: dict[str, Any],
        submit: Callable[[], list[JobHandle]],
    ) -> list[JobHandle]:
        """``submit()``, or with an ``idempotency_key`` the jobs of the key's first request when
        this one is the same: ``request`` as the caller sent it, before any id is made up for it
        (producer/idempotency.py)."""
        if idempotency_key is None:
            return submit()
        keys_ = IdempotencyKeys(self.redis, self.settings.idempotency_seconds)
        digest = fingerprint(request)
        earlier = keys_.claim(idempotency_key, tenant, digest)
        if earlier is not None:
            handles = [
                JobHandle(self, record) for record in self.jobs.get_many(earlier) if record is not None
            ]
            for handle in handles:
                handle.replayed = True
            return handles
        try:
            handles = submit()
        except (InvalidInput, QueueFull):
            keys_.release(idempotency_key, tenant)  # nothing was queued: the key is free again
            raise
        keys_.done(idempotency_key, tenant, digest, [h.job_id for h in handles])
        return handles

    def _submit_many(
        self,
        jobs: list[JobInput],
        batch_id: str | None,
        require_worker: bool,
        tenant: str | None,
        batch_webhook_url: str | None = None,
    ) -> list[JobHandle]:
        if not jobs:
            return []
        if len(jobs) > self.settings.max_jobs_per_submit:
            raise JobRejected(
                f"{len(jobs)} jobs in one submission",
                field="jobs",
                allowed=f"at most {self.settings.max_jobs_per_submit} (LORAFLEET_MAX_JOBS_PER_SUBMIT); split it",
            )
        batch = batch_id or new_id()
        records, problems = [], []
        owners: dict[str, str | None] = {}
        with self.resolver.embeddings.names_read_once():
            for index, raw in enumerate(jobs):
                where = f"jobs[{index}]." if len(jobs) > 1 else ""
                try:
                    job = parse_job(raw, where=where)
                    if job.batch_id is None:
                        job.batch_id = batch
                    resolved = self.resolver.resolve(job, where=where)
                    if job.webhook_url is not None:
                        self._check_webhook(job.webhook_url, where)
                    if tenant is not None:
                        self._check_batch_owner(resolved.job.batch_id, tenant, owners, where)
                    if job.job_id is not None:
                        self._check_unused(resolved.job, where)
                except JobRejected as exc:
                    problems.extend(exc.problems)
                    continue
                records.append(
                    JobRecord(
                        job=resolved.job,
                        queue=resolved.model.queue,
                        warnings=resolved.warnings,
                        tenant=tenant,
                    )
                )
        if not problems:
            problems = self._check_served(records, require_worker, multiple=len(jobs) > 1)
        if problems:
            raise JobRejected(
                "; ".join(f"{field}: {message}" for field, message in problems),
                field=problems[0][0],
                problems=problems,
            )
        if batch_webhook_url is not None:
            self._check_webhook(batch_webhook_url, "", field="batch_webhook_url")
        if batch_webhook_url is not None:
            keep = 2 * self.settings.record_retention + BATCH_INDEX_SLACK
            for batch in {
                r.job.batch_id for r in records if r.job.batch_id
            }:  # before any of its jobs can end
                watch_batch(self.redis, batch, batch_webhook_url, keep)
        self._queue(records)
        return [JobHandle(self, record) for record in records]

    def sweep(
        self,
        spec: SweepSpec | dict[str, Any],
        *,
        batch_id: str | None = None,
        require_worker: bool = False,
        tenant: str | None = None,
        idempotency_key: str | None = None,
        batch_webhook_url: str | None = None,
    ) -> list[JobHandle]:
        """Expand a sweep (common/services/sweeps.py) into one batch and queue it: every job or none.
        When its last job ends, upkeep draws its labelled grid beside the images.
        ``idempotency_key``: as for submit_many; the request is the sweep as given, so a retry
        without a ``batch_id`` is the same request although each try would make up its own."""
        request = {
            "sweep": _plain(spec),
            "batch_id": batch_id,
            "require_worker": require_worker,
            "batch_webhook_url": batch_webhook_url,
        }
        return self._once(
            idempotency_key,
            tenant,
            request,
            lambda: self._sweep(spec, batch_id, require_worker, tenant, batch_webhook_url),
        )

    def _sweep(
        self,
        spec: SweepSpec | dict[str, Any],
        batch_id: str | None,
        require_worker: bool,
        tenant: str | None,
        batch_webhook_url: str | None,
    ) -> list[JobHandle]:
        try:
            spec = spec if isinstance(spec, SweepSpec) else SweepSpec.model_validate(spec)
        except ValidationError as exc:
            raise JobRejected(
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
                field="sweep." + ".".join(map(str, exc.errors()[0]["loc"])),
            ) from None
        jobs, layout = expand(spec, self.settings.max_jobs_per_submit)
        batch = batch_id or new_id()
        keep = 2 * self.settings.record_retention + BATCH_INDEX_SLACK
        save_layout(self.redis, batch, layout, spec.base.get("output_prefix", "images"), keep)
        try:
            return self._submit_many(jobs, batch, require_worker, tenant, batch_webhook_url)
        except BaseException:
            if not self.jobs.batch(batch):
                self.redis.delete(keys.sweep(batch))  # nothing was queued: no layout either
            raise

    def _check_webhook(self, url: str, where: str, field: str = "webhook_url") -> None:
        if self.settings.webhook_secret is None:
            raise JobRejected(
                "this fleet sends no webhooks: LORAFLEET_WEBHOOK_SECRET is not set",
                field=f"{where}{field}",
                allowed=f"no {field}, or ask the operator to set LORAFLEET_WEBHOOK_SECRET",
            )
        check_url(url, self.settings.webhook_allow_private, field=f"{where}{field}")

    def _check_batch_owner(
        self, batch_id: str | None, tenant: str, owners: dict[str, str | None], where: str
    ) -> None:
        """JobRejected when ``batch_id`` already holds jobs that are not ``tenant``'s: a tenant
        adds to its own batches only. ``owners`` remembers the answer per batch."""
        assert batch_id is not None
        if batch_id not in owners:
            first = next(iter(self.jobs.batch(batch_id)), None)
            record = self.jobs.get(first) if first is not None else None
            owners[batch_id] = tenant if record is None else record.tenant
        if owners[batch_id] != tenant:
            raise JobRejected(
                f"batch_id {batch_id!r} is taken", field=f"{where}batch_id", allowed="a new id, or none"
            )

    def _check_unused(self, job: GenerationJob, where: str) -> None:
        """JobRejected when a job id given by the submitter already has images in the store
        (its record expired): the new job would silently overwrite them."""
        if self._storage is None:
            self._storage = open_storage(self.settings)
        assert job.batch_id is not None and job.job_id is not None
        key = image_key(job.output_prefix, job.batch_id, job.job_id, 0)
        if self._storage.exists(key):
            raise JobRejected(
                f"job_id {job.job_id!r} was used before: its images are still in the store ({key})",
                field=f"{where}job_id",
                allowed="a new id, or none (the producer makes one)",
            )

    def _check_served(
        self, records: list[JobRecord], required: bool, multiple: bool
    ) -> list[tuple[str, str]]:
        """Warn on (or, when ``required``, refuse) jobs whose model no live worker serves."""
        live = WorkerRegistry(self.redis).live_models()
        problems = []
        for index, record in enumerate(records):
            model = record.job.model
            if model in live:
                continue
            if required:
                field = f"jobs[{index}].model" if multiple else "model"
                problems.append(
                    (
                        field,
                        f"no live worker serves {model!r}; start one with: lorafleet worker --models {model}",
                    )
                )
            else:
                record.warnings.append(
                    f"no live worker serves {model!r} now: the job waits in "
                    f"{record.queue} until one starts (lorafleet worker --models {model})"
                )
        return problems

    def retry(self, job_id: str) -> JobHandle:
        """Submit a failed or cancelled job again, as a new job in the same batch.

        The new job keeps every resolved value of the old one (seed, size, weights) but its
        LoRAs are resolved again, so a file replaced since is picked up (or refused).
        """
        old = self.get(job_id)
        if old.status not in (JobStatus.failed, JobStatus.cancelled):
            raise JobRejected(
                f"job {job_id} is {old.status.value}", field="job_id", allowed="a failed or cancelled job"
            )
        again = old.job.model_dump(exclude={"job_id"})
        for spec in again["loras"]:
            spec.pop("sha256", None)
            spec["inject_trigger"] = False  # the prompt already carries them
        job = parse_job(again)
        resolved = self.resolver.resolve(job)
        record = JobRecord(
            job=resolved.job,
            queue=resolved.model.queue,
            warnings=resolved.warnings,
            retry_of=job_id,
            tenant=old.tenant,
        )
        self._queue([record])
        return JobHandle(self, record)

    def _queue(self, records: list[JobRecord]) -> None:
        self._check_room(records)
        try:
            self.jobs.create_many(records)
        except redis.ResponseError as exc:  # OOM, or EXECABORT after one inside the transaction
            if not (_redis_full(exc) or isinstance(exc, redis.exceptions.ExecAbortError)):
                raise
            raise _full(exc) from None
        self._send(grouped_by_stack(records))

    def _check_room(self, records: list[JobRecord]) -> None:
        """QueueFull when a model's queue would pass ``max_queued_per_model``, or a tenant's
        waiting jobs ``max_queued_per_tenant``."""
        tenants = Counter(record.tenant for record in records if record.tenant is not None)
        tenant_cap = self.settings.max_queued_per_tenant
        for tenant, count in tenants.items():
            waiting = self.jobs.count_of_tenant(tenant, JobStatus.queued)
            if waiting + count > tenant_cap:
                raise QueueFull(
                    f"tenant {tenant!r} has {waiting} waiting jobs; {count} more would pass its cap of "
                    f"{tenant_cap} (LORAFLEET_MAX_QUEUED_PER_TENANT): submit again when they have run"
                )
        cap = self.settings.max_queued_per_model
        adding = Counter(record.queue for record in records)
        waiting = queue_depths(self.redis, list(adding))
        for queue, count in adding.items():
            depth = sum(waiting[queue].values())
            if depth + count > cap:
                raise QueueFull(
                    f"{queue} holds {depth} waiting jobs; {count} more would pass its cap of {cap} "
                    "(LORAFLEET_MAX_QUEUED_PER_MODEL): submit again when workers have caught up"
                )

    def _send(self, records: Sequence[JobRecord]) -> None:
        sent = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for record in records:
                    send_job(self.celery, record, producer)
                    sent += 1
                    logger.info("queued job %s on %s", record.job_id, record.queue)
        except Exception as exc:  # kombu and redis raise many kinds; all mean "not sent"
            unsent = [r.job_id for r in records[sent:]]
            self.jobs.delete(unsent)
            self.jobs.sent(r.job_id for r in records[:sent])
            if _redis_full(exc) and not sent:
                raise _full(exc) from exc
            raise TransientError(
                f"the broker {self.broker.describe()} refused the jobs after {sent} of "
                f"{len(records)} were queued ({exc}); the other {len(unsent)} were not queued"
            ) from exc
        try:
            self.jobs.sent(r.job_id for r in records)
        except redis.RedisError as exc:  # sent all the same; upkeep may send a harmless duplicate
            logger.warning("jobs sent but not marked so: %s", exc)

    # ------------------------------------------------------------------ LoRAs
    def import_lora(
        self, source: str, *, name: str | None = None, sha256: str | None = None, force: bool = False
    ) -> ImportedLora:
        """Import a LoRA for the whole fleet from a file, a diffusers folder, an http(s) URL
        or a hub repo (see ``lora_sources``): checked, dropped into this machine's folder,
        stored by hash and registered on the broker. Returns what it did."""
        return import_lora(self.settings, source, self.redis, name=name, sha256=sha256, force=force)

    # ------------------------------------------------------------------ follow
    def get(self, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None:
            raise JobRejected(
                f"no job {job_id!r}",
                field="job_id",
                allowed=f"the id of a job submitted in the last {self.settings.record_retention // 3600} h",
            )
        return record

    def batch(self, batch_id: str) -> list[JobRecord]:
        """The records of a batch, in submit order."""
        ids = self.jobs.batch(batch_id)
        return [r for r in self.jobs.get_many(ids) if r is not None]

    def wait(
        self,
        job_ids: Sequence[str],
        timeout: float | None = None,
        on_update: Callable[[list[JobRecord]], None] | None = None,
    ) -> list[JobRecord]:
        """Block until every job has ended (succeeded, failed or cancelled), reading on
        through a Redis outage or failover.

        ``on_update`` is called with the records after each read, for progress displays.
        Raises TimeoutError if ``timeout`` seconds pass first.
        """
        ids = list(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = self._tail()  # before the first read: no change between them is missed
        first = self._read(ids)
        while first is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Redis stayed unavailable for {timeout:g} s")
            time.sleep(POLL_SECONDS)
            first = self._read(ids)
        latest: dict[str, JobRecord] = {}
        for job_id, record in zip(ids, first):
            if record is None:
                self.get(job_id)  # raises, saying how long records are kept
            latest[job_id] = record  # type: ignore[assignment]
        while True:
            # Ended records do not change: only the pending ones are read again.
            pending = [i for i in dict.fromkeys(ids) if not latest[i].status.final]
            found = self._read(pending) or [latest[i] for i in pending]
            for job_id, record in zip(pending, found):
                if record is None:
                    raise JobRejected(f"job {job_id!r} disappeared (its record expired)", field="job_id")
                latest[job_id] = record
            records = [latest[i] for i in ids]
            if on_update:
                on_update(records)
            if all(r.status.final for r in records):
                return records
            if deadline is not None and time.monotonic() >= deadline:
                left = sum(not r.status.final for r in records)
                raise TimeoutError(f"{left} of {len(ids)} jobs still unfinished after {timeout:g} s")
            cursor = self._until_change(cursor, {r.job_id for r in records if not r.status.final})

    def _tail(self) -> str | None:
        try:
            return tail(self.redis)
        except redis.RedisError:
            return None

    def _until_change(self, cursor: str | None, pending: set[str]) -> str | None:
        """Wait for an event of a pending job (at most BLOCK_SECONDS); the new cursor."""
        if cursor is None:
            time.sleep(POLL_SECONDS)
            return self._tail()
        try:
            deadline = time.monotonic() + BLOCK_SECONDS
            while time.monotonic() < deadline:
                events = read_events(self.redis, cursor, block=max(0.01, deadline - time.monotonic()))
                if events:
                    cursor = events[-1].id
                    if any(e.job_id in pending for e in events):
                        break
        except redis.RedisError:
            time.sleep(POLL_SECONDS)
        return cursor

    def watch(
        self,
        *,
        batch_id: str | None = None,
        job_ids: Sequence[str] | None = None,
        after: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[JobEvent]:
        """The events of a batch's jobs or of ``job_ids`` as they happen (queued, running,
        progress, the end), until every one of them has ended; from ``after`` (an event id) on,
        else from now. Raises TimeoutError if ``timeout`` seconds pass first."""
        if (batch_id is None) == (job_ids is None):
            raise BadArgument("watch a batch or jobs", field="batch_id", allowed="batch_id= or job_ids=")
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = after or tail(self.redis)
        watched = list(job_ids) if job_ids is not None else self.jobs.batch(batch_id or "")
        open_ = {r.job_id for r in self.jobs.get_many(watched) if r is not None and not r.status.final}
        while open_:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(open_)} watched jobs still unfinished after {timeout:g} s")
            for event in read_events(self.redis, cursor):
                cursor = event.id
                if event.job_id in open_ or (batch_id is not None and event.batch_id == batch_id):
                    yield event
                    if event.status in ("succeeded", "failed", "cancelled"):
                        open_.discard(event.job_id)

    def _read(self, ids: list[str]) -> list[JobRecord | None] | None:
        """The records, or None while Redis is away or failing over (waits read on)."""
        try:
            return self.jobs.get_many(ids)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            logger.warning("waiting: Redis unavailable (%s); reading again", exc)
            return None

    # ------------------------------------------------------------------ cancel
    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one never runs; a running one stops at its next step."""
        if self.get(job_id).damaged:
            raise JobRejected(f"job {job_id}'s record is damaged; nothing can change it", field="job_id")

        record = self.lifecycle.cancel(job_id)  # a queued job's end: its webhook and counts now
        assert record is not None
        logger.info("cancel of job %s: now %s", job_id, record.status.value)
        return record

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
