"""What the API answers: the response models, a record as a ``JobView``, refusals as 422.

A ``JobView`` carries a CLI line that queues the job again (``resubmit_command``); it is
built here rather than by the CLI, so the API never imports the terminal's display code.
"""

from __future__ import annotations

import shlex

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, create_model

from lorafleet.common.fleet.positions import Standing
from lorafleet.common.fleet.workers import QueueView, WorkerView
from lorafleet.common.schema.errors import InvalidInput
from lorafleet.common.schema.jobs import GenerationJob, JobRecord
from lorafleet.common.schema.prompts import PromptSyntax, format_number

# A record as the API shows it: its id first, the record's own fields, then the image
# URLs and a CLI line that resubmits it. Built field by field rather than by subclassing,
# because JobRecord already has a ``job_id`` property that a field must not shadow.
JobView = create_model(
    "JobView",
    __doc__="A job record with its id, image URLs and a resubmitting CLI line.",
    job_id=(str, ...),
    **{name: (field.annotation, field) for name, field in JobRecord.model_fields.items()},
    image_urls=(list[str], ...),
    cli=(str, ...),
    position=(int | None, None),
    eta_seconds=(float | None, None),
)


class JobPage(BaseModel):
    jobs: list[JobView]
    total: int
    offset: int
    limit: int


class Submitted(BaseModel):
    job_id: str
    batch_id: str
    queue: str
    warnings: list[str]


class Submission(BaseModel):
    batch_id: str
    jobs: list[Submitted]


class BatchView(BaseModel):
    batch_id: str
    counts: dict[str, int]
    jobs: list[JobView]
    images: list[str]
    sweep: list[dict] | None = None
    """A sweep's axes: [{axis, labels}] for X, Y, Z (its jobs carry sweep.x/.y/.z tags)."""
    grids: list[str] = []
    """URLs of a sweep's grid pages, once its last job has ended."""


class Summary(BaseModel):
    counts: dict[str, int]
    queues: list[QueueView]
    workers: list[WorkerView]
    throughput: list[dict[str, int]]
    images_last_hour: int


def job_view(record: JobRecord, standing: Standing | None = None) -> JobView:
    """The record as the API shows it; ``standing``: a queued job's position and estimate
    (read for one job at a time, not for listings)."""
    urls = [f"/v1/jobs/{record.job_id}/images/{i}" for i in range(len(record.images))]
    cli = "" if record.damaged else resubmit_command(record.job)
    where = {} if standing is None else {"position": standing.position, "eta_seconds": standing.eta_seconds}
    return JobView(**record.model_dump(), job_id=record.job_id, image_urls=urls, cli=cli, **where)


def submission(handles: list, response: Response) -> Submission:
    """What a submit answers: the batch and its jobs; 200 instead of 201 when an idempotent
    retry got the first request's jobs."""
    if handles and handles[0].replayed:
        response.status_code = 200
    return Submission(
        batch_id=handles[0].batch_id,
        jobs=[
            Submitted(job_id=h.job_id, batch_id=h.batch_id, queue=h.queue, warnings=h.warnings)
            for h in handles
        ],
    )


def problems(exc: InvalidInput) -> JSONResponse:
    """A 422 that names each refused field and what is wrong with it."""
    return JSONResponse({"detail": [{"field": f, "message": m} for f, m in exc.problems]}, status_code=422)


def resubmit_command(job: GenerationJob) -> str:
    """A `lorafleet submit` command line that queues this job again, values as resolved."""
    args = ["lorafleet", "submit", "--model", job.model, "--prompt", job.prompt]
    if job.negative_prompt:
        args += ["--negative", job.negative_prompt]
    for spec in job.loras:
        text = f"{spec.name}:{format_number(spec.weight)}" if spec.weight is not None else spec.name
        if spec.text_encoder_weight is not None:
            text += f":{format_number(spec.text_encoder_weight)}"
        args += ["--lora", text]
    args += ["--sampler", job.sampler.value, "--steps", str(job.steps), "--cfg", format_number(job.cfg_scale)]
    if job.guidance is not None:
        args += ["--guidance", format_number(job.guidance)]
    if job.loras and job.lora_mode is not None:
        args += ["--lora-mode", job.lora_mode.value]
    if job.clip_skip != 1:
        args += ["--clip-skip", str(job.clip_skip)]
    if job.prompt_syntax is not PromptSyntax.a1111:
        args += ["--prompt-syntax", job.prompt_syntax.value]
    if job.vae:
        args += ["--vae", job.vae]
    if job.width:
        args += ["--width", str(job.width)]
    if job.height:
        args += ["--height", str(job.height)]
    if job.seed is not None:
        args += ["--seed", str(job.seed)]
    if job.num_images != 1:
        args += ["--images", str(job.num_images)]
    if job.batch_size is not None:
        args += ["--batch-size", str(job.batch_size)]
    if job.output_prefix != "images":
        args += ["--prefix", job.output_prefix]
    if job.priority.value != "normal":
        args += ["--priority", job.priority.value]
    for key, value in job.tags.items():
        args += ["--tag", f"{key}={value}"]
    if job.webhook_url:
        args += ["--webhook", job.webhook_url]
    return shlex.join(args)
