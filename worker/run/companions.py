"""The jobs waiting in a model's queue, seen from a worker that wants to sample them along.

A worker runs one Celery task at a time (solo pool, prefetch 1: messages stay in Redis, where
any worker can take them). When a job starts, the runner looks at the next messages of the
job's queue, oldest first and highest priority first (Celery's Redis lists, named in
``common/schema/keys.py``), and takes those whose jobs can share its sampling calls: it removes the
message (LREM: if another worker took it first, nothing is removed and the job is left) and
starts the job's record under its own run. The job is listed unsent before its message is
taken and unlisted once its record has started, so a worker (or Redis) failing in between
leaves a queued record that upkeep sends a new message. From then on the record is the claim:
if the worker dies, upkeep hands the running record back to the queue with a new message
(common/fleet/upkeep.py); if the job meets a transient failure, its record is queued again and
listed as unsent, and upkeep sends its message.

The list's raw message is parsed only for Celery's task name and id (the job id), the two
headers lorafleet itself sets when it sends (``common/queue.send_job``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from lorafleet.common.fleet.queue import message_job
from lorafleet.common.schema import keys

logger = logging.getLogger(__name__)

PEEK = 64
"""Messages looked at per priority step when a job starts."""


@dataclass(frozen=True)
class Waiting:
    """One message waiting in a Redis list: its job id and where it is."""

    job_id: str
    list_key: str
    raw: bytes


class WaitingJobs:
    """Reads and takes messages of one worker's queues in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def peek(self, queue: str, limit: int = PEEK) -> list[Waiting]:
        """The next messages of ``queue``, in the order Celery would deliver them."""
        lists = keys.priority_lists(queue)
        pipe = self.redis.pipeline(transaction=False)
        for key in lists:
            pipe.lrange(key, -limit, -1)  # producers push on the left, workers pop on the right
        found = []
        for key, raws in zip(lists, pipe.execute()):
            for raw in reversed(raws):
                parsed = message_job(raw)
                if parsed is not None and not parsed[1]:  # a job queued again waits out its delay
                    found.append(Waiting(parsed[0], key, raw))
        return found

    def take(self, waiting: Waiting) -> bool:
        """Remove the message from its list; False if another worker took it first."""
        return bool(self.redis.lrem(waiting.list_key, 1, waiting.raw))
