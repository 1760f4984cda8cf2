"""The worker side from the shell: `lorafleet worker`, `make-tiny-model`, `make-demo-loras`,
`make-tiny-controlnet`, `make-tiny-t2i-adapter`, `make-tiny-ip-adapter`.

Each command reaches ``lorafleet.worker`` through ``worker_side`` when it runs, so a
producer-only install lists them and says how to install the worker side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.terminal import EXIT_REJECTED, console, fail, run
from lorafleet.producer.cli.worker_side import worker_side

TINY_FAMILIES = (
    "sd15",
    "sd15-inpainting",
    "sd2",
    "sdxl",
    "flux1",
    "flux1-schnell",
    "zimage",
    "qwenimage",
    "flux2",
)
"""Families ``make-tiny-model`` writes (lorafleet.worker.tiny's, named here: the producer never
imports the worker side until a command runs)."""


def worker(
    models: Annotated[
        str, typer.Option("--models", help="Models to serve, comma-separated (names, folders or hub ids).")
    ],
    name: Annotated[str | None, typer.Option(help="Worker node name (default lorafleet-PID@HOST).")] = None,
    preload: Annotated[bool, typer.Option(help="Load the models' pipelines before taking jobs.")] = False,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            help="One worker process per device, supervised: all (every GPU), or a list such as "
            "cuda:0,cuda:1 or cpu,cpu. Each is named NAME-<i>@HOST.",
        ),
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run a worker: one job at a time, pipelines kept hot, on cuda when present, else cpu."""
    _configure_logging(loglevel)

    def action():
        served = [m.strip() for m in models.split(",") if m.strip()]
        if not served:
            raise BadArgument("no model named", field="--models", allowed="NAME[,NAME...]")
        if devices is not None:
            supervisor = worker_side("supervisor")
            extra = ["--loglevel", loglevel] + (["--preload"] if preload else [])
            base = name or supervisor.default_base_name()
            raise typer.Exit(
                supervisor.Supervisor(supervisor.parse_devices(devices), models, base, extra).run()
            )
        service = worker_side("service")
        instance = service.Worker(Settings(), served, name=name)
        if preload:
            instance.preload()
        instance.run(loglevel=loglevel)

    run(action)


def make_tiny_model(
    folder: Annotated[Path, typer.Argument(help="Folder to write the pipeline into.")],
    family: Annotated[
        str,
        typer.Option(
            help="sd15, sd2, sdxl, flux1 (FLUX.1 dev), flux1-schnell, zimage, qwenimage or flux2 (FLUX.2 Klein)."
        ),
    ] = "sd15",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny offline diffusers pipeline (random weights) for tests and demos."""
    if family not in TINY_FAMILIES:
        fail(f"--family: got {family!r} (allowed: {', '.join(TINY_FAMILIES)})", EXIT_REJECTED)
    tiny = worker_side("tiny")
    path = tiny.make_tiny_model(folder, family=family, seed=seed)
    console.print(f"wrote a tiny {family} pipeline to {path}", markup=False, highlight=False)


def make_demo_loras(
    model: Annotated[Path, typer.Option("--model", help="The pipeline folder the LoRAs are for.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the LoRA files into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random factors.")] = 0,
) -> None:
    """Write demo LoRAs for a pipeline folder, in the formats its family's users bring (SD:
    kohya, LoCon, PEFT, an LCM-LoRA shape; FLUX.1, Z-Image, Qwen-Image, FLUX.2 Klein: PEFT,
    kohya/musubi, the original code's names, LyCORIS and the family's other trainers)."""
    tiny = worker_side("tiny")
    if not (model / "model_index.json").is_file():
        fail(f"--model: {model} is not a diffusers pipeline folder (no model_index.json)", EXIT_REJECTED)
    for path in tiny.make_demo_loras(model, out, seed=seed):
        console.print(f"wrote {path}", markup=False, highlight=False)


def make_tiny_controlnet(
    model: Annotated[Path, typer.Option("--model", help="The tiny SD or FLUX.1 pipeline folder it is for.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the ControlNet into (diffusers layout).")
    ],
    seed: Annotated[int, typer.Option(help="Seed of its random zero convolutions.")] = 0,
) -> None:
    """Write a tiny ControlNet for a tiny SD or FLUX.1 pipeline folder (tests and demos; offline)."""
    if _is_flux1(model):
        console.print(
            f"wrote {worker_side('tiny_flow').make_tiny_flux_controlnet(model, out, seed=seed)}",
            markup=False,
            highlight=False,
        )
        return
    _make_add_on("make_tiny_controlnet", model, out, seed)


def _is_flux1(model: Path) -> bool:
    """Whether ``model`` is a FLUX.1 pipeline folder (by its model_index.json's class)."""
    import json

    from lorafleet.common.schema.family import FAMILY_BY_PIPELINE, Family

    try:
        class_name = json.loads((model / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(class_name, str) and FAMILY_BY_PIPELINE.get(class_name) is Family.flux1


def make_tiny_t2i_adapter(
    model: Annotated[Path, typer.Option("--model", help="The tiny SD pipeline folder it is for.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the T2I-Adapter into (diffusers layout).")
    ],
    seed: Annotated[int, typer.Option(help="Seed of its random weights.")] = 0,
) -> None:
    """Write a tiny T2I-Adapter for a tiny SD pipeline folder (tests and demos; offline)."""
    _make_add_on("make_tiny_t2i_adapter", model, out, seed)


def make_tiny_ip_adapter(
    model: Annotated[Path, typer.Option("--model", help="The tiny SD pipeline folder it is for.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder to write the IP-Adapter into (its weights and image_encoder/, as h94's)."
        ),
    ],
    seed: Annotated[int, typer.Option(help="Seed of its random weights.")] = 0,
) -> None:
    """Write a tiny IP-Adapter for a tiny SD pipeline folder (tests and demos; offline)."""
    _make_add_on("make_tiny_ip_adapter", model, out, seed)


def _make_add_on(maker: str, model: Path, out: Path, seed: int) -> None:
    """Write a tiny add-on model (``worker.tiny``'s ``maker``) for the tiny SD pipeline ``model``."""
    tiny = worker_side("tiny")
    if not (model / "unet" / "config.json").is_file():
        allowed = (
            " or a FLUX.1 one (model_index.json naming FluxPipeline)"
            if maker == "make_tiny_controlnet"
            else ""
        )
        fail(f"--model: {model} is not an SD pipeline folder (no unet/config.json){allowed}", EXIT_REJECTED)
    console.print(f"wrote {getattr(tiny, maker)(model, out, seed=seed)}", markup=False, highlight=False)


def _configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
