"""The end of a batch: what happens once, when every job of a batch has ended.

fleet/lifecycle.py counts each job's end in its batch's tracker (``keys.batch_end``: the
jobs submitted into the batch, and those that ended) in the same atomic step that ends the
job, and puts the batch on ``keys.BATCHES_ENDED`` when the two meet. ``BatchEnds`` takes
batches from there one at a time, each just before handling it, for a lease of
LEASE_SECONDS (services/leases.py), renewed as a long grid is drawn (every few cells): while
the lease holds, no other process handles the batch, and one that dies mid-way leaves it to
the next when the lease runs out; a handler that finds its lease taken over stops. It hands the
batch to its two consumers: the batch webhook (one ``batch.ended`` event, when the batch was
submitted with ``batch_webhook_url``) and the sweep grid (when the batch is a sweep), then
takes the batch off the set only if its lease still holds. Both consumers can run twice
without harm, even at once (a handler that outlived its lease goes on beside the next
holder): the event is queued once by its id, the grid drawn again over the same keys. A
batch that gets more jobs after it ended (a retry) ends again, which also ends the lease of
whoever is handling it: its grid is drawn again, its event is not sent twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import redis

from lorafleet.common.fleet.store import JobStore
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema import keys
from lorafleet.common.services import leases
from lorafleet.common.services.grids import GridBuilder
from lorafleet.common.services.webhooks import queue_event

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""How long a process holds the one ended batch it is handling (drawing a large grid takes a while)."""
BATCH = 10
"""Ended batches one pass handles at most (each claimed in turn)."""


_DONE = f"""
if {leases.HELD} then redis.call('ZREM', KEYS[1], ARGV[1]) end
"""


def batch_event_id(batch_id: str) -> str:
    return f"msg_batch_{batch_id}"


def watch_batch(client: redis.Redis, batch_id: str, url: str, keep: int) -> None:
    """Send ``url`` a ``batch.ended`` event when the batch's last job has ended."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.batch_webhook(batch_id), "url", url)
    pipe.expire(keys.batch_webhook(batch_id), keep)
    pipe.execute()


def batch_event(store: JobStore, batch_id: str) -> dict[str, Any]:
    """The ``batch.ended`` event: counts by status and every job's images."""
    records = [r for r in store.get_many(store.batch(batch_id)) if r is not None and not r.damaged]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    return {
        "type": "batch.ended",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "data": {
            "batch_id": batch_id,
            "counts": counts,
            "jobs": [
                {
                    "job_id": r.job_id,
                    "status": r.status.value,
                    "error": r.error,
                    "images": [i.uri for i in r.images],
                    "tags": r.job.tags,
                }
                for r in records
            ],
        },
    }


class BatchEnds:
    """Hands ended batches to their consumers."""

    def __init__(self, store: JobStore, storage: Storage) -> None:
        self.store = store
        self.redis = store.redis
        self.grids = GridBuilder(store.redis, storage)

    def handle_due(self, now: float | None = None) -> list[str]:
        """Handle up to BATCH batches ended by ``now`` (default: the time), each claimed just
        before it is handled (services/leases.py); returns those handled."""
        done = []
        for claim in leases.claim_each(self.redis, keys.BATCHES_ENDED, now, BATCH, LEASE_SECONDS):
            try:
                self.handle(claim.id, claim.keep)
            except Exception as exc:  # the store away, Redis failing over: the lease runs out, then again
                logger.warning("end of batch %s not handled yet: %s", claim.id, exc)
                continue
            # done while the lease holds: not if it ended again meanwhile (a retry's end
            # re-scored it: handle it again), nor if the lease ran out (the next holder's)
            self.redis.register_script(_DONE)(
                keys=[keys.BATCHES_ENDED], args=[claim.id, repr(claim.deadline)]
            )
            done.append(claim.id)
        return done

    def handle(self, batch_id: str, keep: Callable[[], None] = lambda: None) -> None:
        """Queue the batch's webhook event and draw its grid; ``keep`` renews the lease as the
        grid is drawn (LeaseLost: another process holds the batch now)."""
        url = self.redis.hget(keys.batch_webhook(batch_id), "url")
        if url is not None:
            url = url.decode() if isinstance(url, bytes) else url
            if queue_event(self.redis, batch_event_id(batch_id), url, batch_event(self.store, batch_id)):
                logger.info("batch %s ended: its webhook event is queued", batch_id)
        if self.redis.exists(keys.sweep(batch_id)):
            self.grids.build(batch_id, keep=keep)
