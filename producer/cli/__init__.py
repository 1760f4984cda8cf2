"""The ``lorafleet`` command: one module per command group.

    jobs            submit, submit-file, status, wait, cancel
    catalog         models (list, add, remove), loras (list, inspect, import)
    fleet           workers (list, check), queues, serve, version
    embedded_redis  redis (start, stop, status)
    worker          worker, make-tiny-model, make-demo-loras, make-tiny-controlnet,
                    make-tiny-t2i-adapter, make-tiny-ip-adapter

Producer commands need only the producer install; worker commands (and `loras inspect`
for a registered LoRA or with --model) import the worker side through ``worker_side``
when they run, and say how to install it when it is missing. ``terminal`` holds what every
command shares (consoles, exit codes, errors as messages), ``display`` the tables and the
wait display.

Exit codes: 0 done; 1 a job ended failed or cancelled, or a wait timed out; 2 the input was
refused; 3 lorafleet could not work here (configuration, broker or storage unreachable).
"""

from __future__ import annotations

import typer

from lorafleet.producer.cli import add_ons, catalog, embedded_redis, fleet, jobs, sweeps, worker

app = typer.Typer(
    name="lorafleet",
    help="A distributed job queue for batch image generation with LoRA stacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(embedded_redis.redis_app, name="redis")
app.add_typer(catalog.models_app, name="models")
app.add_typer(catalog.loras_app, name="loras")
app.add_typer(catalog.embeddings_app, name="embeddings")
app.add_typer(catalog.vaes_app, name="vaes")
app.add_typer(add_ons.controlnets_app, name="controlnets")
app.add_typer(add_ons.upscalers_app, name="upscalers")
app.add_typer(fleet.workers_app, name="workers")
# Commands are listed in `lorafleet --help` in this order.
app.command("queues")(fleet.queues)
app.command()(jobs.submit)
app.command("submit-file")(jobs.submit_file)
app.command()(jobs.status)
app.command("wait")(jobs.wait_command)
app.command()(sweeps.sweep)
app.command()(sweeps.fetch)
app.command()(jobs.cancel)
app.command()(worker.worker)
app.command("make-tiny-model")(worker.make_tiny_model)
app.command("make-demo-loras")(worker.make_demo_loras)
app.command("make-tiny-controlnet")(worker.make_tiny_controlnet)
app.command("make-tiny-t2i-adapter")(worker.make_tiny_t2i_adapter)
app.command("make-tiny-ip-adapter")(worker.make_tiny_ip_adapter)
app.command()(fleet.serve)
app.command()(fleet.version)


def main() -> None:
    app()
