"""Submitting, the half of the SDK's Client that queues: jobs, batches, sweeps and retries,
each validated and resolved completely before anything is written (if one job of a
``submit_many`` is refused, none is queued). A job's record is written (queued) before its
message is sent, so a worker never meets a job without a record; if the broker refuses the
send, the records of the jobs not sent are removed again and TransientError says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from pydantic import BaseModel, ValidationError

from lorafleet.common.fleet.queue import queue_depths, send_job
from lorafleet.common.fleet.store import BATCH_INDEX_SLACK
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import image_key, open_storage
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import InvalidInput, JobRejected, QueueFull, TransientError
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, JobStatus, parse_job
from lorafleet.common.services.batches import watch_batch
from lorafleet.common.services.sweeps import SweepSpec, expand, save_layout
from lorafleet.common.services.webhooks import check_url
from lorafleet.producer.idempotency import IdempotencyKeys, fingerprint
from lorafleet.producer.resolver import new_id

logger = logging.getLogger(__name__)

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

    def __init__(self, client: Any, record: JobRecord) -> None:
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


class Submitting:
    """Mixed into Client (producer/client.py): its submitting half."""

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
        with self.resolver.embeddings.names_read_once(), self.resolver.models.looked_up_once():
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
        When its last job ends, the services loop draws its labelled grid beside the images.
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
            self._keep_inputs(records)  # the input images they name, written before the records
            stored = self.jobs.create_many(records)
        except redis.ResponseError as exc:  # OOM, or EXECABORT after one inside the transaction
            if not (_redis_full(exc) or isinstance(exc, redis.exceptions.ExecAbortError)):
                raise
            raise _full(exc) from None
        self._send(grouped_by_stack(records), stored)

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

    def _send(self, records: Sequence[JobRecord], stored: dict[str, str]) -> None:
        sent = 0
        try:
            with self.celery.producer_or_acquire() as producer:
                for record in records:
                    send_job(self.celery, record, producer, queued=stored[record.job_id])
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
