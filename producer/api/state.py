"""What every route works with: built once by ``create_app``, kept on ``app.state.api``.

A route asks for it with a parameter ``state: State``; nothing is held in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lorafleet.common.models import ModelRegistry
from lorafleet.common.settings import Settings
from lorafleet.common.storage import LocalStorage, S3Storage
from lorafleet.common.workers import WorkerRegistry
from lorafleet.producer.client import Client


@dataclass(frozen=True)
class ApiState:
    """The fleet that one app serves: its settings, the SDK client, workers, storage, models."""

    settings: Settings
    client: Client
    workers: WorkerRegistry
    storage: LocalStorage | S3Storage
    models: ModelRegistry


async def get_state(request: Request) -> ApiState:
    # async: it only reads app.state, so it runs on the event loop rather than in a thread.
    return request.app.state.api


State = Annotated[ApiState, Depends(get_state)]
"""A route parameter's type that gives the route the app's ``ApiState``."""
