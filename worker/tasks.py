"""The Celery task: thin — it hands the job id to the JobRunner, which does the rest.

The message carries only the job id; the job itself is read from its record, the one source
of job state. The runner ends every job's record itself, so the task returns and the
message is acknowledged (acks_late) only then. The one exception: a job the runner queued
again after a transient failure is sent again with a countdown (Celery's retry publishes
the new message before the old one is acknowledged, so it is never lost).
"""

from __future__ import annotations

from celery import Celery

from lorafleet.common.jobs import JobStatus
from lorafleet.common.queue import TASK_GENERATE
from lorafleet.worker.runner import JobRunner


def register_tasks(app: Celery, runner: JobRunner) -> None:
    @app.task(
        name=TASK_GENERATE,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=None,
    )
    def generate(task, job_id: str) -> str | None:
        status = runner.run(job_id)
        if status is JobStatus.queued:
            raise task.retry(countdown=runner.requeue_delay)
        return status.value if status else None
