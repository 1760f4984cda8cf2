"""The fleet from a shell: `lorafleet workers`, `queues`, `serve` (the API) and `version`.

`workers check` is what a container's health or readiness probe runs: it exits 0 only
when a worker on this host (or with the given name) has an alive heartbeat.
"""

from __future__ import annotations

import socket
from typing import Annotated

import redis
import typer
from rich.table import Table

from lorafleet.common import __version__
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.workers import STALE_AFTER, WorkerRegistry, locally_alive, queue_views
from lorafleet.common.infra.broker import resolve_broker
from lorafleet.common.schema.errors import LorafleetError
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.terminal import EXIT_JOB_FAILED, console, errors, print_json, run, safe

workers_app = typer.Typer(help="Workers and their heartbeats.", no_args_is_help=True)


def _registry() -> WorkerRegistry:
    return WorkerRegistry(resolve_broker(Settings()).client())


@workers_app.command("list")
def workers_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every known worker: liveness, models, hot pipelines, current job, counters."""
    views = run(lambda: _registry().all())
    if as_json:
        print_json([v.model_dump(mode="json") for v in views])
        return
    table = Table("worker", "state", "seen", "device", "serves", "hot", "now", "done", "failed")
    for v in views:
        now = f"{v.current_job[:8]} step {v.current_step}/{v.current_total}" if v.current_job else "idle"
        table.add_row(
            v.name,
            v.liveness,
            f"{v.age:.0f} s ago",
            v.device,
            ", ".join(v.models),
            ", ".join(v.hot_pipelines) or "-",
            now,
            str(v.jobs_done),
            str(v.jobs_failed),
        )
    console.print(table if views else "no workers have sent a heartbeat")


@workers_app.command("check")
def workers_check(
    name: Annotated[str | None, typer.Option(help="The worker's node name.")] = None,
    host: Annotated[str | None, typer.Option(help="Any worker on this host (default: this machine).")] = None,
) -> None:
    """Exit 0 when the worker has an alive heartbeat (for health and readiness probes)."""
    host = host or socket.gethostname()
    try:
        views = _registry().all()
    except (redis.RedisError, LorafleetError) as exc:
        # Redis away: judge this machine's workers by their alive files, so that an outage of
        # Redis does not fail (and restart) every worker of the fleet
        local = locally_alive(Settings().home, name) if host == socket.gethostname() else []
        if local:
            console.print(f"alive (Redis unreachable: {safe(str(exc))}): {', '.join(local)}", highlight=False)
            return
        views = run(lambda: _registry().all())
    matching = [v for v in views if (v.name == name if name else v.host == host)]
    alive = [v for v in matching if v.liveness == "alive"]
    if alive:
        console.print(f"alive: {', '.join(v.name for v in alive)}", highlight=False)
        return
    what = f"worker {name!r}" if name else f"a worker on host {host!r}"
    seen = f"; last beat {min(v.age for v in matching):.0f} s ago" if matching else "; no heartbeat at all"
    errors.print(
        f"not alive: {what} has no heartbeat newer than {STALE_AFTER:.0f} s{seen}",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(EXIT_JOB_FAILED)


def queues(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Jobs waiting per model queue (by priority) and the live workers serving each."""
    settings = Settings()

    def collect():
        client = resolve_broker(settings).client()
        known = set(ModelRegistry(settings, client).names())  # and those live workers serve
        return queue_views(client, known, WorkerRegistry(client).all())

    views = run(collect)
    if as_json:
        print_json([v.model_dump(mode="json") for v in views])
        return
    table = Table("model", "queue", "waiting", "high", "normal", "low", "live workers")
    for v in views:
        p = v.by_priority
        table.add_row(
            v.model,
            v.queue,
            str(v.depth),
            str(p["0"]),
            str(p["3"]),
            str(p["6"]),
            ", ".join(v.workers) or "[yellow]none[/]",
        )
    console.print(table if views else "no models and no queues yet")


LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Addresses `serve` may listen on without tokens."""


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default LORAFLEET_API_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default LORAFLEET_API_PORT, 8750).")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the HTTP API and the dashboard (FastAPI on uvicorn); OpenAPI docs at /docs."""
    import uvicorn

    from lorafleet.producer.api import create_app
    from lorafleet.producer.auth import parse_tokens

    settings = Settings()
    host = host or settings.api_host
    port = port or settings.api_port
    if not parse_tokens(settings.api_tokens):
        if host not in LOOPBACK:
            errors.print(
                f"[yellow]warning:[/] no LORAFLEET_API_TOKENS: refusing to listen on {safe(host)}; "
                "listening on 127.0.0.1 only",
                highlight=False,
            )
            host = "127.0.0.1"
        console.print(
            "no LORAFLEET_API_TOKENS set: the API and the dashboard are open to this machine only "
            "(127.0.0.1); set tokens to serve other machines",
            highlight=False,
        )
    app_instance = run(lambda: create_app(settings))
    console.print(f"dashboard: http://{host}:{port}/   API docs: http://{host}:{port}/docs", highlight=False)
    uvicorn.run(
        app_instance,
        host=host,
        port=port,
        log_level=loglevel,
        proxy_headers=True,  # X-Forwarded-Proto from a trusted proxy: the session cookie is Secure
        forwarded_allow_ips=settings.api_trusted_proxies,
    )


def version() -> None:
    """Print lorafleet's version."""
    console.print(__version__)
