"""The HTTP API (FastAPI): the same jobs, errors and records as the SDK, over JSON.

    POST   /v1/jobs                    one job or a list (one batch); 422 names each bad field;
                                       Idempotency-Key: a retry gets the first jobs (200)
    GET    /v1/jobs                    filters status, batch, model; paging offset, limit
    GET    /v1/jobs/{id}               the record, its image URLs, a CLI line that resubmits it
    DELETE /v1/jobs/{id}               cancel
    POST   /v1/jobs/{id}/retry         a failed or cancelled job, as a new job
    GET    /v1/jobs/{id}/webhook       the job's webhook event and its delivery attempts
    GET    /v1/jobs/{id}/images/{i}    the PNG (a local file through the app, S3 by redirect)
    GET    /v1/batches/{id}            counts by status, the jobs, the image URLs; a sweep's axes and grids
    GET    /v1/batches/{id}/grids/{z}  a sweep's grid page
    POST   /v1/sweeps                  a base job and axes, expanded into one batch
    GET    /v1/events                  job changes as server-sent events (batch=, job=; Last-Event-ID)
    POST   /v1/loras                   import a LoRA from a download link or a hub repo
    GET    /v1/workers, /v1/queues     heartbeats; per-model queue depth and who serves it
    GET    /v1/summary                 what the dashboard's overview shows, in one call
    GET    /metrics                    Prometheus text format
    GET    /healthz                    Redis reachable (no token needed)

One router per resource: ``jobs``, ``batches``, ``events``, ``loras``, ``fleet``, and ``pages`` for the dashboard,
whose pages read the same endpoints. ``views`` holds the response models, ``state`` what
the routes share. ``create_app`` here builds the app and is the only thing that does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from lorafleet.common import __version__
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.workers import WorkerRegistry
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.errors import (
    ConfigError,
    DuplicateRequest,
    InvalidInput,
    QueueFull,
    TransientError,
)
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.loop import Background
from lorafleet.producer.api import batches, events, fleet, images, jobs, loras, pages
from lorafleet.producer.api.guard import LOOPBACK_HOSTS, RequestGuard
from lorafleet.producer.api.state import ApiState
from lorafleet.producer.api.views import problems
from lorafleet.producer.auth import TokenMiddleware, parse_tokens
from lorafleet.producer.client import Client

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API and dashboard for the fleet that ``settings`` points at."""
    settings = settings or Settings()
    client = Client(settings)
    state = ApiState(
        settings=settings,
        client=client,
        workers=WorkerRegistry(client.redis),
        storage=open_storage(settings),
        models=ModelRegistry(settings, client.redis),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the API's part in upkeep and the services loop (common/services/loop.py)
        background = Background(settings, client.jobs, client.celery, state.storage).start()
        try:
            yield
        finally:
            background.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="lorafleet",
        version=__version__,
        description="A distributed job queue for batch image generation with LoRA stacks.",
        separate_input_output_schemas=False,
    )
    tokens = parse_tokens(settings.api_tokens)
    if tokens:
        app.add_middleware(TokenMiddleware, tokens=tokens, client=client.redis)
    extra_hosts = {h.strip().lower() for h in settings.api_allowed_hosts.split(",") if h.strip()}
    app.add_middleware(
        RequestGuard,
        max_body=int(settings.api_max_body_mb * 1024 * 1024),
        allowed_hosts=None if tokens else LOOPBACK_HOSTS | extra_hosts,
    )
    app.state.api = state
    app.state.client = client  # for scripts and tests that reach in
    app.state.settings = settings

    @app.exception_handler(InvalidInput)
    async def rejected(request: Request, exc: InvalidInput) -> JSONResponse:
        return problems(exc)

    @app.exception_handler(DuplicateRequest)
    async def duplicate(request: Request, exc: DuplicateRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "30"})

    @app.exception_handler(TransientError)
    @app.exception_handler(ConfigError)
    @app.exception_handler(redis.ConnectionError)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"unavailable: {exc}"}, status_code=503)

    app.include_router(jobs.router)
    app.include_router(batches.router)
    batches.add_sweep_schema(app)
    app.include_router(events.router)
    app.include_router(loras.router)
    app.include_router(images.router)
    app.include_router(fleet.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    app.include_router(pages.dashboard(tokens, client.redis))
    return app
