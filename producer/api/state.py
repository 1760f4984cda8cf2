"""What every route works with: built once by ``create_app``, kept on ``app.state.api``.

A route asks for it with a parameter ``state: State``; nothing is held in module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import LocalStorage, S3Storage
from lorafleet.common.schema.settings import Settings
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


async def get_tenant(request: Request) -> str | None:
    # set by the token middleware; absent when the API runs without tokens
    return getattr(request.state, "tenant", None)


Tenant = Annotated[str | None, Depends(get_tenant)]
"""A route parameter's type that gives the caller's tenant: None for an operator (a bare or
admin token, or no tokens at all), who sees every job; else the tenant, who sees its own."""


def visible(record_tenant: str | None, tenant: str | None) -> bool:
    """Whether a caller of ``tenant`` may see a job of ``record_tenant``."""
    return tenant is None or record_tenant == tenant
