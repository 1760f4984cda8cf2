"""The Celery task: thin — it hands the job id to the JobRunner, which does the rest.

The message carries only the job id; the job itself is read from its record, the one source
of job state. The runner ends every job's record itself, so the task always returns and
the message is acknowledged (acks_late) only then.
"""

from __future__ import annotations

from celery import Celery

from lorafleet.common.queue import TASK_GENERATE
from lorafleet.worker.runner import JobRunner


def register_tasks(app: Celery, runner: JobRunner) -> None:
    @app.task(name=TASK_GENERATE, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def generate(job_id: str) -> str | None:
        status = runner.run(job_id)
        return status.value if status else None
