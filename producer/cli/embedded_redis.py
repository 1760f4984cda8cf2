"""`lorafleet redis`: the embedded Redis, the broker when LORAFLEET_BROKER_URL is unset."""

from __future__ import annotations

import typer

from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.terminal import console, run

redis_app = typer.Typer(
    help="The embedded Redis (used when LORAFLEET_BROKER_URL is unset).", no_args_is_help=True
)


@redis_app.command("start")
def redis_start() -> None:
    """Start the embedded Redis (or find it running) and print its URL."""
    settings = Settings()
    run(lambda: console.print(embedded_redis(settings).ensure_running(), markup=False, highlight=False))


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the embedded Redis; its append-only file keeps every queued job."""
    stopped = embedded_redis(Settings()).stop()
    console.print("stopped" if stopped else "not running")


@redis_app.command("status")
def redis_status() -> None:
    """Say whether the embedded Redis runs, and where."""
    embedded = embedded_redis(Settings())
    if embedded.ping():
        console.print(f"running at {embedded.url}", markup=False, highlight=False)
    else:
        console.print(f"not running (data in {embedded.folder})", markup=False, highlight=False)
        raise typer.Exit(1)
