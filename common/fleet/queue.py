"""The Celery app: configuration, one queue per base model, priorities, the task name.

Routing is configuration: a job's queue is derived from its base model's name, and a
worker consumes the queues of the models it serves. Producers send the task by its name
(``lorafleet.generate``) and never import the worker.

Semantics of priorities: Celery's Redis transport keeps one list per priority step
(``keys.priority_lists``) and a worker pops from the lowest step first, so ``high`` = 0,
``normal`` = 3, ``low`` = 6.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from lorafleet.common.infra.broker import Broker
from lorafleet.common.schema import keys
from lorafleet.common.schema.jobs import JobRecord, Priority
from lorafleet.common.schema.settings import Settings

TASK_GENERATE = "lorafleet.generate"
"""Name of the one task: run one GenerationJob end to end."""
PRIORITY_VALUE = {Priority.high: 0, Priority.normal: 3, Priority.low: 6}
"""Message priority per job priority (lower is sooner on Redis)."""


def queue_depths(client, queues: list[str]) -> dict[str, dict[int, int]]:
    """Messages waiting per queue, by priority step (one round trip for all of them)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in keys.priority_lists(queue):
            pipe.llen(key)
    counts = iter(pipe.execute())
    return {queue: {step: next(counts) for step in keys.PRIORITY_STEPS} for queue in queues}


def celery_config(settings: Settings, broker: Broker) -> dict[str, Any]:
    """Celery's whole configuration, derived from lorafleet's settings in one place."""
    return {
        "broker_url": broker.celery_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": list(keys.PRIORITY_STEPS),
            # A job held by a worker that died goes back to its queue once the visibility
            # timeout has passed; sweep for such jobs every tenth of it (at most every 10 s)
            # instead of kombu's default of roughly every 100 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
            # No hang on a stalled Redis: kombu's blocking pops wait 1 s, well inside these.
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "socket_keepalive": True,
            "health_check_interval": 15,
            "retry_on_timeout": True,
            **broker.transport_options(),
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Job state lives in the JobRecord in Redis; Celery keeps no second copy.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # A job is acknowledged only after its images are stored and its record is final.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time: the rest wait in Redis for any worker (a worker takes the
        # compatible ones along itself, worker/run/companions.py).
        "worker_prefetch_multiplier": 1,
        "task_default_priority": PRIORITY_VALUE[Priority.normal],
        # Events for Flower and the dashboard.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def worker_argv(name: str, queues: list[str], loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line of a lorafleet worker: one job at a time, in the
    process that holds the pipelines (the solo pool), consuming ``queues``."""
    return [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--hostname={name}",
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        "--without-mingle",
        "--without-gossip",
        "--task-events",
    ]


def send_job(app: Celery, record: JobRecord, producer=None, *, queued: str | None = None) -> None:
    """Send the job's message to its model's queue at its priority (the task id is the job id).

    ``queued`` is the record as the producer stored it: the message carries it as a hint, so a
    worker's start is one round trip (``Lifecycle.start``'s guess, compared with the stored
    record inside Redis and never taken for it; a stale hint costs one more round trip)."""
    kwargs: dict[str, Any] = {"job_id": record.job_id}
    shown = f"{{'job_id': {record.job_id!r}"
    if queued is not None:
        kwargs["queued"] = queued
        shown += f", 'queued': <the record as queued, {len(queued)} characters>"
    app.send_task(
        TASK_GENERATE,
        kwargs=kwargs,
        # what Flower and the task events show: Celery would put a second copy of the record
        # there (cut at 1024 characters), in every message and each event about it
        kwargsrepr=shown + "}",
        task_id=record.job_id,
        queue=record.queue,
        priority=PRIORITY_VALUE[record.job.priority],
        producer=producer,
    )


def message_job(raw: bytes) -> tuple[str, bool] | None:
    """(job id, whether it waits out a delay) of a raw ``lorafleet.generate`` message in a
    queue's Redis list, from the two headers ``send_job`` and Celery's retry set; None for
    anything else."""
    try:
        headers = json.loads(raw).get("headers") or {}
    except (ValueError, AttributeError):
        return None
    if headers.get("task") != TASK_GENERATE or not isinstance(headers.get("id"), str):
        return None
    return headers["id"], headers.get("eta") is not None


def make_celery(settings: Settings, broker: Broker) -> Celery:
    """The Celery app of one lorafleet process (producer or worker)."""
    app = Celery("lorafleet", set_as_current=False)
    app.conf.update(celery_config(settings, broker))
    return app
