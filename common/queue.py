"""The Celery app: configuration, one queue per base model, priorities, the task name.

Routing is configuration: a job's queue is derived from its base model's name, and a
worker consumes the queues of the models it serves. Producers send the task by its name
(``lorafleet.generate``) and never import the worker.

Semantics of priorities: Celery's Redis transport keeps one list per priority step
(``queue``, ``queue\\x06\\x163``, ``queue\\x06\\x166``, ``queue\\x06\\x169``) and a worker
pops from the lowest step first, so ``high`` = 0, ``normal`` = 3, ``low`` = 6.
"""

from __future__ import annotations

import re
from typing import Any

from celery import Celery

from lorafleet.common.broker import Broker
from lorafleet.common.jobs import Priority
from lorafleet.common.settings import Settings

TASK_GENERATE = "lorafleet.generate"
"""Name of the one task: run one GenerationJob end to end."""
QUEUE_PREFIX = "lorafleet.model."
"""Queue of base model M is QUEUE_PREFIX + M's key."""
PRIORITY_STEPS = [0, 3, 6, 9]
"""Celery's Redis priority lists (kombu's default steps; KEDA and Flower count the same)."""
PRIORITY_SEPARATOR = "\x06\x16"
"""Between a queue's name and its priority step in the Redis list's key (kombu's default)."""
PRIORITY_VALUE = {Priority.high: 0, Priority.normal: 3, Priority.low: 6}
"""Message priority per job priority (lower is sooner on Redis)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def queue_for(model_key: str) -> str:
    """The Celery queue of one base model."""
    return QUEUE_PREFIX + _UNSAFE.sub("_", model_key)


def priority_lists(queue: str) -> list[str]:
    """The Redis list keys that hold ``queue``'s messages, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def queue_depths(client, queues: list[str]) -> dict[str, dict[int, int]]:
    """Messages waiting per queue, by priority step (one round trip for all of them)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in priority_lists(queue):
            pipe.llen(key)
    counts = iter(pipe.execute())
    return {queue: {step: next(counts) for step in PRIORITY_STEPS} for queue in queues}


def celery_config(settings: Settings, broker: Broker) -> dict[str, Any]:
    """Celery's whole configuration, derived from lorafleet's settings in one place."""
    return {
        "broker_url": broker.celery_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "priority_steps": PRIORITY_STEPS,
            # A job held by a worker that died goes back to its queue once the visibility
            # timeout has passed; sweep for such jobs every tenth of it (at most every 10 s)
            # instead of kombu's default of roughly every 100 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
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
        "worker_prefetch_multiplier": 1,
        "task_default_priority": PRIORITY_VALUE[Priority.normal],
        # Events for Flower and the dashboard.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_celery(settings: Settings, broker: Broker) -> Celery:
    """The Celery app of one lorafleet process (producer or worker)."""
    app = Celery("lorafleet", set_as_current=False)
    app.conf.update(celery_config(settings, broker))
    return app
