"""The services loop: a thread of its own in every worker and API process that delivers due
webhook events and hands ended batches to their consumers (grids, batch webhooks). Each
event and each batch is held under a lease while one process handles it, so any number of
processes run the loop at once; a slow webhook receiver delays only this thread, never a
heartbeat or the fleet's upkeep."""

from __future__ import annotations

from collections.abc import Callable

import redis
from celery import Celery

from lorafleet.common.catalog.input_images import InputImages
from lorafleet.common.catalog.input_retention import InputRetention
from lorafleet.common.fleet.store import JobStore
from lorafleet.common.fleet.upkeep import HANDBACK_SECONDS, Periodic, Upkeep
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.batches import BatchEnds
from lorafleet.common.services.webhooks import webhook_sender

INTERVAL = 2.0
"""Seconds between two passes (a pass delivers at most webhooks.BATCH events)."""


class ServicesLoop:
    """One pass: ``run``; ``start`` runs it every INTERVAL seconds in its own thread."""

    def __init__(self, settings: Settings, store: JobStore, storage: Storage) -> None:
        self.webhooks = webhook_sender(settings, store.redis)
        self.batches = BatchEnds(store, storage)
        self._thread = Periodic("lorafleet-services", self.run, INTERVAL)

    def run(self) -> None:
        self.webhooks.deliver_due()
        self.batches.handle_due()

    def start(self) -> ServicesLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()


class Background:
    """What every worker and API process runs beside its own work: the fleet's upkeep under
    its lease (fleet/upkeep.py) and the services loop, each in its own thread."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        app: Celery,
        storage: Storage,
        own: Callable[[], tuple[str, set[str]]] | None = None,
        orphans: set[str] | None = None,
    ) -> None:
        retention = InputRetention(store.redis, settings.input_image_grace, settings.record_retention)
        self.upkeep = Upkeep(
            store,
            WorkerRegistry(store.redis),
            app,
            settings.worker_lost_after,
            own=own,
            orphans=orphans,
            inputs=InputImages(storage, settings.max_input_pixels, retention),
        )
        self._upkeep = Periodic("lorafleet-upkeep", self.upkeep.run, HANDBACK_SECONDS)
        self.services = ServicesLoop(settings, store, storage)

    def start(self) -> Background:
        self._upkeep.start()
        self.services.start()
        return self

    def stop(self) -> None:
        self._upkeep.stop()
        self.services.stop()
        try:
            self.upkeep.lease.release()  # another process takes upkeep over at once
        except redis.RedisError:
            pass
