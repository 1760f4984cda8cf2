"""How records look on a terminal: tables, a progress display, one-line summaries."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from lorafleet.common.fleet.positions import Standing
from lorafleet.common.schema.jobs import PHASES, JobRecord, JobStatus
from lorafleet.producer.cli.terminal import safe

STATUS_STYLE = {
    JobStatus.queued: "yellow",
    JobStatus.running: "cyan",
    JobStatus.succeeded: "green",
    JobStatus.failed: "red",
    JobStatus.cancelled: "magenta",
}
PHASE_TITLES = ("queue", "load", "lora", "apply", "sample", "restore", "upload", "total")


def status_text(status: JobStatus) -> str:
    return f"[{STATUS_STYLE[status]}]{status.value}[/]"


def lora_stack(record: JobRecord) -> str:
    return safe(" + ".join(f"{spec.name}:{spec.weight:g}" for spec in record.job.loras) or "-")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def jobs_table(records: Sequence[JobRecord], title: str | None = None) -> Table:
    """One row per job: what it ran."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column("job", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("sampler", no_wrap=True)
    table.add_column("seed", justify="right", no_wrap=True)
    table.add_column("loras")
    for record in records:
        job = record.job
        table.add_row(
            record.job_id[:8],
            status_text(record.status),
            "damaged record" if record.damaged else f"{job.sampler.value} {job.steps}@{job.cfg_scale:g}",
            str(job.seed),
            lora_stack(record),
        )
    return table


def timings_table(records: Sequence[JobRecord], title: str | None = None) -> Table:
    """One row per job: seconds spent in each phase."""
    table = Table(title=title, box=box.SIMPLE_HEAD, caption="seconds per phase", caption_justify="right")
    table.add_column("job", no_wrap=True)
    for heading in PHASE_TITLES:
        table.add_column(heading, justify="right", no_wrap=True)
    for record in records:
        table.add_row(record.job_id[:8], *(_seconds(getattr(record.timings, phase)) for phase in PHASES))
    return table


def print_report(console: Console, records: Sequence[JobRecord]) -> None:
    """What ran, how long each phase took, and where the images went."""
    console.print(jobs_table(records))
    console.print(timings_table(records))
    for line in outputs_lines(records):
        console.print(line, highlight=False, soft_wrap=True)


def outputs_lines(records: Sequence[JobRecord]) -> list[str]:
    """Where each job's images went (or why there are none), one line each."""
    lines = []
    for record in records:
        for image in record.images:
            lines.append(f"{record.job_id[:8]}  {safe(image.uri)}")
        if not record.images:
            lines.append(
                f"{record.job_id[:8]}  {status_text(record.status)}: {safe(record.error or 'no images yet')}"
            )
    return lines


def standing_text(where: Standing) -> str:
    """``3 ahead, starts in ~40 s`` for a queued job."""
    ahead = f"{where.position}{'' if where.exact else '+'} ahead"
    if where.eta_seconds is None:
        return f"{ahead} (no recent throughput for an estimate)"
    return f"{ahead}, done in ~{where.eta_seconds:.0f} s"


def record_table(record: JobRecord, where: Standing | None = None) -> Table:
    """Everything about one job, as key/value rows (``where``: a queued job's standing)."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    job = record.job
    if record.damaged:
        table.add_row("job", record.job_id)
        table.add_row("error", f"[red]{safe(record.error or '')}[/]")
        return table
    rows = [
        ("job", record.job_id),
        ("batch", job.batch_id or ""),
        ("status", status_text(record.status)),
        ("progress", f"{record.progress.step}/{record.progress.total}"),
        *([("position", standing_text(where))] if where is not None else []),
        ("model", safe(job.model)),
        ("loras", lora_stack(record)),
        ("prompt", safe(job.prompt)),
        ("negative", safe(job.negative_prompt) or "-"),
        ("sampler", f"{job.sampler.value}, {job.steps} steps, CFG {job.cfg_scale:g}"),
        ("size", f"{job.width}x{job.height}, {job.num_images} image(s), seed {job.seed}"),
        ("priority", job.priority.value),
        ("worker", safe(record.worker or "-")),
        ("attempts", str(record.attempts)),
        ("submitted", record.submitted_at.isoformat(timespec="seconds")),
        ("finished", record.finished_at.isoformat(timespec="seconds") if record.finished_at else "-"),
        (
            "timings",
            ", ".join(
                f"{phase} {getattr(record.timings, phase):.2f}s"
                for phase in PHASES
                if getattr(record.timings, phase) is not None
            )
            or "-",
        ),
        (
            "lora cache",
            "-"
            if record.timings.lora_hits is None
            else f"{record.timings.lora_hits} hit(s), {record.timings.lora_misses} miss(es)",
        ),
    ]
    rows += [
        ("image", safe(f"{image.uri} ({image.size} bytes, seed {image.seed})")) for image in record.images
    ]
    rows += [("warning", f"[yellow]{safe(w)}[/]") for w in record.warnings]
    if record.error:
        rows.append(("error", f"[red]{safe(record.error)}[/]"))
    for key, value in rows:
        table.add_row(key, value)
    return table


class DownloadProgress:
    """One bar for a download, shown only once bytes arrive (a local file shows nothing)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("downloading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self) -> DownloadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def update(self, received: int, total: int | None) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("download", total=total)
        self.progress.update(self.task, completed=received)


class WaitDisplay:
    """A progress bar per job (or one for all, past ``max_bars`` jobs) while waiting."""

    def __init__(self, console: Console, job_ids: Sequence[str], max_bars: int = 12) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.single = len(job_ids) > max_bars
        if self.single:
            self.tasks = {
                "all": self.progress.add_task(f"{len(job_ids)} jobs", total=len(job_ids), status="")
            }
        else:
            self.tasks = {i: self.progress.add_task(i[:8], total=None, status="queued") for i in job_ids}

    def __enter__(self) -> WaitDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, records: Sequence[JobRecord]) -> None:
        if self.single:
            counts: dict[str, int] = {}
            for record in records:
                counts[record.status.value] = counts.get(record.status.value, 0) + 1
            done = sum(record.status.final for record in records)
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self.progress.update(self.tasks["all"], completed=done, status=summary)
            return
        for record in records:
            total = record.progress.total or None
            step = record.progress.step
            if record.status is JobStatus.succeeded and total:
                step = total
            self.progress.update(
                self.tasks[record.job_id], total=total, completed=step, status=status_text(record.status)
            )
