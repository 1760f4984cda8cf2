"""Submitting and watching jobs: `lorafleet submit`, `submit-file`, `status`, `wait`, `cancel`."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from lorafleet.common.fleet.positions import standing
from lorafleet.common.schema import samplers
from lorafleet.common.schema.errors import BadArgument, JobRejected
from lorafleet.common.schema.jobs import JobRecord, JobStatus, LoraMode, Priority
from lorafleet.common.schema.prompts import PromptSyntax
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli.display import WaitDisplay, print_report, record_table
from lorafleet.producer.cli.job_inputs import controlnet_unit, image_option, ip_adapter_unit
from lorafleet.producer.cli.terminal import EXIT_JOB_FAILED, console, errors, print_json, run, safe


def _client():
    from lorafleet.producer.client import Client

    return Client(Settings())


def _parse_lora(text: str) -> dict[str, Any]:
    """NAME[:WEIGHT[:TEXT_ENCODER_WEIGHT]] -> a LoraSpec dict (a name with a colon is refused later, naming it)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    spec: dict[str, Any] = {"name": ":".join(parts)}
    if numbers:
        spec["weight"] = numbers[0]
    if len(numbers) > 1:
        spec["text_encoder_weight"] = numbers[1]
    return spec


def _parse_tags(tags: Sequence[str]) -> dict[str, str]:
    parsed = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep:
            raise BadArgument(f"{tag!r} is not KEY=VALUE", field="--tag")
        parsed[key] = value
    return parsed


def _wait_and_report(client, job_ids: list[str], timeout: float | None, as_json: bool) -> None:
    if as_json:
        records = client.wait(job_ids, timeout=timeout)
        print_json([r.to_json() for r in records])
    else:
        with WaitDisplay(console, job_ids) as display:
            records = client.wait(job_ids, timeout=timeout, on_update=display.update)
        print_report(console, records)
    if any(r.status is not JobStatus.succeeded for r in records):
        raise typer.Exit(EXIT_JOB_FAILED)


BatchId = Annotated[
    str | None, typer.Option("--batch-id", help="Batch to add the jobs to (default: a new one).")
]
RequireWorker = Annotated[
    bool,
    typer.Option(
        "--require-worker",
        help="Refuse the jobs when no live worker serves their model (default: queue them with a warning).",
    ),
]
Wait = Annotated[
    bool, typer.Option("--wait", help="Wait for the jobs, with progress, then print their timings.")
]
Timeout = Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _queue(
    jobs: list,
    batch_id: str | None,
    require_worker: bool,
    wait: bool,
    timeout: float | None,
    as_json: bool,
    batch_webhook: str | None = None,
) -> None:
    """Submit ``jobs`` as one batch, say what was queued, and wait for them when asked."""
    client = _client()
    handles = client.submit_many(
        jobs, batch_id=batch_id, require_worker=require_worker, batch_webhook_url=batch_webhook
    )
    follow(client, handles, wait, timeout, as_json)


def follow(client, handles, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Say what was queued, and wait for it when asked."""
    _report_submitted(handles, as_json, wait)
    if wait:
        _wait_and_report(client, [h.job_id for h in handles], timeout, as_json)


def _report_submitted(handles, as_json: bool, waiting: bool) -> None:
    if as_json and not waiting:
        print_json([{"job_id": h.job_id, "batch_id": h.batch_id, "warnings": h.warnings} for h in handles])
        return
    if as_json:
        return
    for handle in handles:
        console.print(
            f"queued [bold]{handle.job_id}[/] (batch {handle.batch_id}) on {handle.job.model}, "
            f"seed {handle.job.seed}",
            highlight=False,
        )
        for warning in handle.warnings:
            errors.print(f"[yellow]warning:[/] {safe(warning)}", highlight=False)


def submit(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Registered model name, diffusers folder or hub id."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            "-p",
            help="What to draw, in A1111's syntax: (word:1.2), [word], BREAK, <lora:NAME:WEIGHT> "
            "(<lora:NAME:TE:UNET> for separate text-encoder and UNet weights).",
        ),
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative", "-n", help="What not to draw.")] = None,
    from_png: Annotated[
        Path | None,
        typer.Option(
            "--from-png",
            help="Regenerate this PNG (lorafleet, A1111, Forge or InvokeAI): its prompt, LoRAs, sampler, "
            "steps, CFG, seed, size, clip skip and model; any other option given here overrides the PNG's value.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    lora: Annotated[
        list[str],
        typer.Option(
            "--lora",
            "-l",
            help="NAME[:WEIGHT[:TEXT_ENCODER_WEIGHT]], repeatable, in stack order (before tags).",
        ),
    ] = [],  # noqa: B006
    inject_triggers: Annotated[
        bool, typer.Option("--inject-triggers", help="Append each LoRA's trigger words to the prompt.")
    ] = False,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="Sampler, by lorafleet's or A1111's name (default euler_a; lcm with --lcm; euler, the model's own "
            "scheduler, on the flow families): " + samplers.allowed()
        ),
    ] = None,
    lcm: Annotated[
        bool,
        typer.Option(
            "--lcm",
            help="The LCM recipe of InvokeAI's LoRA guidance: LCM sampler, CFG 1, 4 steps, the family's LCM-LoRA at 0.35.",
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(help="Sampling steps (default 25; 4 under lcm; the family's on FLUX.1 and the others)."),
    ] = None,
    cfg: Annotated[
        float | None,
        typer.Option(
            "--cfg",
            help="CFG against the negative prompt, 1 is off, on every family (default 7; 1 under lcm; the family's).",
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance",
            help='Distilled guidance of models that read one (FLUX.1 dev and Krea, Forge\'s "Distilled CFG Scale"; '
            "default 3.5); refused on other models.",
        ),
    ] = None,
    lora_mode: Annotated[
        LoraMode | None,
        typer.Option(
            "--lora-mode",
            help="merge (into the weights) or side (beside them: jobs with other stacks share its calls); "
            "default LORAFLEET_LORA_MODE.",
        ),
    ] = None,
    clip_skip: Annotated[
        int | None,
        typer.Option(
            "--clip-skip", help="A1111's clip skip, 1-12 (default 1: the text encoder's last layer)."
        ),
    ] = None,
    prompt_syntax: Annotated[
        PromptSyntax | None,
        typer.Option("--prompt-syntax", help="a1111 (default) or compel (InvokeAI's syntax)."),
    ] = None,
    vae: Annotated[
        str | None, typer.Option(help="A VAE in autoimport/vae to decode with (default: the model's).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(help="Width in pixels, a multiple of 8 (default: the model's native size).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Height in pixels, a multiple of 8 (default: the model's native size).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: random, recorded).")] = None,
    images: Annotated[int, typer.Option("--images", help="Images per job (seeds seed, seed+1, ...).")] = 1,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Rows of every sampling call the job's images run in, 1-64 (default: the worker's for the model "
            "and size); its pixels depend on it, never on the jobs sharing its calls.",
        ),
    ] = None,
    init_image: Annotated[
        str | None,
        typer.Option(
            "--init-image",
            help="img2img: an image file (uploaded for you) or a stored sha256:... name; the job's size "
            "defaults to its own.",
        ),
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option(
            "--mask",
            help="Inpainting: the mask (white is repainted), a file or sha256:..., the init image's size.",
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            "--strength", help="Denoising strength with --init-image, 0-1 (default 0.75, as A1111)."
        ),
    ] = None,
    mask_blur: Annotated[
        int | None, typer.Option("--mask-blur", help="Pixels the mask's edge is blurred by (default 4).")
    ] = None,
    inpaint_padding: Annotated[
        int | None,
        typer.Option(
            "--inpaint-padding",
            help="Inpaint only the masked region with this many pixels around it (A1111's Only masked).",
        ),
    ] = None,
    controlnet: Annotated[
        list[str],
        typer.Option(
            "--controlnet",
            help="NAME,IMAGE[,WEIGHT[,START,END]]: a ControlNet or T2I-Adapter of autoimport/controlnet with its control map "
            "(a file, uploaded for you, or sha256:...); repeatable.",
        ),
    ] = [],  # noqa: B006
    ip_adapter: Annotated[
        str | None,
        typer.Option(
            "--ip-adapter",
            help="NAME,IMAGE[,WEIGHT]: an IP-Adapter of autoimport/ip_adapter and its image prompt (a file, "
            "uploaded for you, or sha256:...).",
        ),
    ] = None,
    hr_scale: Annotated[
        float | None,
        typer.Option("--hr-scale", help="A1111's hires fix: upscale by this (1-4) and sample again."),
    ] = None,
    hr_upscaler: Annotated[
        str | None,
        typer.Option("--hr-upscaler", help="Latent (default), Latent (nearest), ..., Lanczos, Nearest."),
    ] = None,
    hr_steps: Annotated[
        int | None, typer.Option("--hr-steps", help="Steps of the hires pass (default: --steps).")
    ] = None,
    hr_strength: Annotated[
        float | None,
        typer.Option("--hr-strength", help="Denoising strength of the hires pass (default 0.7)."),
    ] = None,
    count: Annotated[int, typer.Option("--count", help="Submit N jobs with consecutive seeds.")] = 1,
    prefix: Annotated[str, typer.Option("--prefix", help="Storage key prefix of the images.")] = "images",
    priority: Annotated[Priority, typer.Option(help="Queue priority.")] = Priority.normal,
    tag: Annotated[list[str], typer.Option("--tag", help="KEY=VALUE, repeatable, kept on the record.")] = [],  # noqa: B006
    webhook: Annotated[
        str | None, typer.Option("--webhook", help="An http(s) URL POSTed a signed event when the job ends.")
    ] = None,
    batch_webhook: Annotated[
        str | None,
        typer.Option(
            "--batch-webhook", help="An http(s) URL POSTed one signed event when all the jobs have ended."
        ),
    ] = None,
    batch_id: BatchId = None,
    require_worker: RequireWorker = False,
    wait: Wait = False,
    timeout: Timeout = None,
    as_json: Json = False,
) -> None:
    """Queue one job (or --count jobs with consecutive seeds), or regenerate a PNG with --from-png."""

    def action():
        if count < 1 or count > 10_000:
            raise BadArgument(f"got {count}", field="--count", allowed="1 to 10000")
        given = {
            "model": model,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "sampler": sampler,
            "steps": steps,
            "cfg_scale": cfg,
            "guidance": guidance,
            "lora_mode": lora_mode.value if lora_mode else None,
            "clip_skip": clip_skip,
            "prompt_syntax": prompt_syntax.value if prompt_syntax else None,
            "vae": vae,
            "width": width,
            "height": height,
            "seed": seed,
            "batch_size": batch_size,
            "init_image": image_option(init_image, "--init-image", _client),
            "mask_image": image_option(mask, "--mask", _client),
            "strength": strength,
            "mask_blur": mask_blur,
            "inpaint_padding": inpaint_padding,
            "controlnets": [controlnet_unit(text, _client) for text in controlnet] or None,
            "ip_adapter": ip_adapter_unit(ip_adapter, _client) if ip_adapter else None,
            "hr_scale": hr_scale,
            "hr_upscaler": hr_upscaler,
            "hr_steps": hr_steps,
            "hr_strength": hr_strength,
        }
        given = {k: v for k, v in given.items() if v is not None}
        listed = [_parse_lora(text) | ({"inject_trigger": True} if inject_triggers else {}) for text in lora]
        if from_png is None:
            for option, name in (("--model", "model"), ("--prompt", "prompt")):
                if name not in given:
                    raise BadArgument("missing", field=option, allowed=f"{option} VALUE, or --from-png FILE")
            job: dict[str, Any] = given | {"loras": listed}
        else:
            read = _client().read_png(from_png, **given, **({"loras": listed} if listed else {}))
            for note in read.notes:
                errors.print(f"[yellow]warning:[/] {safe(note)}", highlight=False)
            job = read.fields
            if lcm:  # the recipe's sampler, steps and CFG, unless given here
                for name in ("sampler", "steps", "cfg_scale"):
                    if name not in given:
                        job.pop(name, None)
        job |= {
            "lcm": lcm,
            "num_images": images,
            "output_prefix": prefix,
            "priority": priority.value,
            "tags": _parse_tags(tag),
        }
        if webhook is not None:
            job["webhook_url"] = webhook
        base_seed = job.get("seed")
        if base_seed is None and count > 1:
            base_seed = secrets.randbelow(2**32)  # one draw, so the count's seeds are consecutive
        jobs = [
            job if base_seed is None else job | {"seed": (base_seed + n * images) % 2**32}
            for n in range(count)
        ]
        _queue(jobs, batch_id, require_worker, wait, timeout, as_json, batch_webhook)

    run(action)


def submit_file(
    path: Annotated[
        Path, typer.Argument(help="JSON Lines: one job object per line.", exists=True, dir_okay=False)
    ],
    batch_id: BatchId = None,
    require_worker: RequireWorker = False,
    wait: Wait = False,
    timeout: Timeout = None,
    as_json: Json = False,
) -> None:
    """Queue every job of a JSON Lines file as one batch: all of them, or none."""

    def action():
        jobs = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                jobs.append(json.loads(line))
            except ValueError as exc:
                raise JobRejected(
                    f"line {number} is not JSON: {exc}", field=f"{path.name}:{number}"
                ) from None
        if not jobs:
            raise JobRejected("no jobs in the file", field=str(path))
        _queue(jobs, batch_id, require_worker, wait, timeout, as_json)

    run(action)


def status(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids (or a batch id with --batch).")],
    batch: Annotated[bool, typer.Option("--batch", help="The ids are batch ids.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show jobs: status, progress, timings, images, warnings, error."""

    def action():
        client = _client()
        records: list[JobRecord] = []
        for job_id in job_ids:
            records.extend(client.batch(job_id) if batch else [client.get(job_id)])
        if as_json:
            print_json([r.to_json() for r in records])
        elif len(records) == 1:
            console.print(record_table(records[0], standing(client.redis, records[0])))
        else:
            print_report(console, records)

    run(action)


def wait_command(
    job_ids: Annotated[list[str], typer.Argument(help="Job ids to wait for.")],
    timeout: Annotated[float | None, typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Wait for jobs to end, with progress; exit 1 if any did not succeed."""
    run(lambda: _wait_and_report(_client(), list(job_ids), timeout, as_json))


def cancel(job_ids: Annotated[list[str], typer.Argument(help="Job ids to cancel.")]) -> None:
    """Cancel jobs: a queued job never runs; a running one stops at its next step."""

    def action():
        client = _client()
        for job_id in job_ids:
            record = client.cancel(job_id)
            if record.status is JobStatus.cancelled:
                console.print(f"{job_id}: cancelled", markup=False)
            elif record.cancel_requested:
                console.print(f"{job_id}: running; it stops at its next step", markup=False)
            else:
                console.print(f"{job_id}: already {record.status.value}; nothing to cancel", markup=False)

    run(action)
