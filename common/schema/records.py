"""What became of a job, beside the job itself: its progress, its phases' timings, its
stored images and its runs (common/schema/jobs.py's JobRecord holds them)."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Progress(BaseModel):
    """Sampling progress: ``step`` of ``total`` (over all images of the job)."""

    step: int = 0
    total: int = 0


class Timings(BaseModel):
    """Seconds spent in each phase of a job; None where the phase has not happened.

    ``lora_load`` covers finding, hashing and parsing the stack's LoRAs; ``lora_hits`` and
    ``lora_misses`` say how many came from the worker's cache and how many were parsed.
    ``restore`` is the weights' restore after the last sampling call of the jobs sampled
    together; a job whose images all came from an earlier call ended before it (None).
    """

    queue_wait: float | None = None
    pipeline_load: float | None = None
    lora_load: float | None = None
    lora_hits: int | None = None
    lora_misses: int | None = None
    lora_apply: float | None = None
    sampling: float | None = None
    restore: float | None = None
    upload: float | None = None
    total: float | None = None
    batch_size: int | None = None
    """Rows of the sampling calls this job's images ran in (its own images, other jobs', or
    copies filling them): its pixels depend on them, not on how many jobs shared them
    (worker/run/batching.py, docs/benchmarks.md)."""


PHASES = ("queue_wait", "pipeline_load", "lora_load", "lora_apply", "sampling", "restore", "upload", "total")
"""The timed phases of a job, in the order they happen (the fields of Timings that are seconds)."""


class ImageRef(BaseModel):
    """One stored image."""

    uri: str
    key: str
    size: int
    sha256: str
    width: int
    height: int
    seed: int


class Run(BaseModel):
    """One run of a job on a worker process, as the record keeps it (fleet/lifecycle.py)."""

    run_id: str
    """Its fencing token: only this run writes the record while it is the current one."""
    worker: str
    instance: str
    started_at: datetime
    ended_at: datetime | None = None
    outcome: str | None = None
    """How it ended: succeeded, failed, cancelled, queued again, handed back, or lost (another
    run took the job over after its worker stopped beating); None while it runs."""
