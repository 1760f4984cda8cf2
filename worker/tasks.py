"""The Celery task: thin — it hands the job id to the JobRunner, which does the rest.

The message carries the job id and, as a hint, the record as it was queued; the job itself is
read from its record, the one source of job state (the hint is only the start's first guess,
compared with the stored record inside Redis: fleet/lifecycle.py). The runner ends every job's record itself, so the task returns and the
message is acknowledged (acks_late) only then. The one exception: a job the runner queued
again after a transient failure is sent again with a countdown (Celery's retry publishes
the new message before the old one is acknowledged); if that publish fails, or Redis fails
mid-job, the message is rejected back to its queue instead of acknowledged, so the job is
never lost and its record never stranded.

The runner may take compatible jobs waiting in the queue along with the task's own
(worker/run/companions.py): their messages are removed from Redis, and their records, running under
this worker, are what keeps them from being lost.
"""

from __future__ import annotations

import redis
from celery import Celery
from celery.exceptions import Reject

from lorafleet.common.fleet.queue import TASK_GENERATE
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.worker.run.runner import JobRunner


def register_tasks(app: Celery, runner: JobRunner) -> None:
    @app.task(
        name=TASK_GENERATE,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,
    )
    def generate(task, job_id: str, queued: str | None = None) -> str | None:
        try:
            status = runner.run(job_id, queued)
        except redis.RedisError as exc:
            # The record could not be written (the broker went away mid-job): give the message
            # back rather than acknowledge it; the next run's start takes the record over. The
            # giving back fails too when Redis is away, so the job is also remembered: upkeep
            # lists it unsent once Redis is back, and a queued job gets a message again.
            runner.orphans.add(job_id)
            raise Reject(f"job {job_id}: Redis failed mid-job ({exc})", requeue=True) from exc
        if status is JobStatus.queued:
            try:
                raise task.retry(countdown=runner.requeue_delay)
            except Reject as exc:  # the new message could not be published: keep the old one
                raise Reject(exc.reason, requeue=True) from exc
        return status.value if status else None
