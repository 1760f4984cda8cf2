"""The job schema: what a producer asks for (GenerationJob) and what became of it (JobRecord).

Everything a producer sends crosses this schema, so every limit lives here and every
refusal names the field and what is allowed. ``parse_job`` turns any mapping into a
GenerationJob or raises JobRejected with one line per bad field.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lorafleet.common.schema import guidance, hires, inputs, samplers
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.names import check_lora_name as check_lora_name
from lorafleet.common.schema.prompts import PromptSyntax
from lorafleet.common.schema.records import PHASES as PHASES
from lorafleet.common.schema.records import ImageRef, Progress, Run, Timings, utcnow
from lorafleet.common.schema.samplers import Sampler

# ---------------------------------------------------------------------------- limits
MIN_SIZE = 64
"""Smallest width or height in pixels."""
MAX_SIZE = 2048
"""Largest width or height in pixels."""
SIZE_MULTIPLE = 8
"""Width and height must be multiples of this (the VAE's downscale factor)."""
MAX_STEPS = 150
"""Most sampling steps a job may ask for."""
MAX_CFG = 30.0
"""Largest classifier-free guidance scale."""
MAX_GUIDANCE = 30.0
"""The largest distilled guidance a job may ask for (Forge's "Distilled CFG Scale" slider)."""
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -4.0, 4.0
"""Range of a LoRA's weight (and of its separate text-encoder weight)."""
MAX_LORAS = 8
"""Most LoRAs in one job's stack."""
MAX_PROMPT_CHARS = 2000
"""Longest prompt or negative prompt, in characters."""
MAX_IMAGES = 8
"""Most images one job makes."""
MAX_SEED = 2**32 - 1
"""Largest seed (seeds are unsigned 32-bit, as in A1111 and InvokeAI)."""
MAX_BATCH_SIZE = 64
"""Most rows a sampling call may have (``GenerationJob.batch_size``, LORAFLEET_MAX_BATCH)."""
SIDE_PATH_RANK_BUDGET = 128
"""LoRA ranks every row of a side-path call is padded to (worker/lora/side_paths.py); a stack
joining more runs merged (producer/resolver.py)."""
MAX_EMBEDDINGS = 16
"""Most textual-inversion embeddings one job's prompts may use."""
MAX_TAGS = 32
"""Most free-form tags on a job."""
MAX_CLIP_SKIP = 12
"""Largest clip skip (A1111's meaning: 1 is the text encoder's last layer, 2 the one before)."""

DEFAULT_STEPS = 25
"""Steps for standard samplers when a job gives none."""
DEFAULT_CFG = 7.0
"""CFG for standard samplers when a job gives none."""

_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
ID_PATTERN = re.compile(rf"^{_ID}$")
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
PREFIX_PATTERN = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,7}}$")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
"""A tenant's name, as ``LORAFLEET_API_TOKENS`` gives it (``tenant:token``)."""
ADMIN_TENANT = "admin"
"""The tenant whose tokens see and act on every job (a token without a tenant is one too)."""


class Priority(str, Enum):
    """Queue priority, honoured through Celery's Redis priority lists."""

    high = "high"
    normal = "normal"
    low = "low"


class LoraMode(str, Enum):
    """How a job's LoRAs run: merged into the weights (exact restore after), or beside them
    on side paths, where jobs with different stacks share one sampling call. The two differ
    by rounding (docs/benchmarks.md); a job's mode is on its record and in its PNG."""

    merge = "merge"
    side = "side"


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset((JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled))


Weight = Annotated[float, Field(ge=MIN_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)]
Prompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


class LoraSpec(BaseModel):
    """One LoRA of a job's stack.

    ``weight`` None means InvokeAI's LoRA guidance's starting point (``guidance``): 0.75 for a LoRA alone, 0.45 beside
    an LCM-LoRA, 0.35 for the LCM-LoRA itself (filled in at submit). ``text_encoder_weight``
    None means the same as ``weight``. ``sha256`` is filled in at submit from the file the
    name resolved to; the worker refuses a file whose hash differs.
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    weight: Weight | None = None
    text_encoder_weight: Weight | None = None
    inject_trigger: bool = False
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None

    @field_validator("name")
    @classmethod
    def _plain_file_name(cls, name: str) -> str:
        check_lora_name(name)
        return name


_NEEDS = {
    "inpaint_padding": "mask_image",
    "mask_blur": "mask_image",
    "hr_upscaler": "hr_scale",
    "hr_steps": "hr_scale",
    "hr_strength": "hr_scale",
}
"""Fields that mean something only beside another (the rest: beside init_image)."""


class GenerationJob(BaseModel):
    """What a producer asks for: one prompt on one base model with one LoRA stack.

    ``job_id`` and ``batch_id`` are set by the producer when left out. ``steps`` and
    ``cfg_scale`` default by sampler (LCM: 4 and 1; others: 25 and 7); ``width`` and
    ``height`` default to the model's native size at submit; ``seed`` None is drawn at
    submit so that every record can be reproduced. ``lcm=True`` asks for the guidance's LCM
    recipe (LCM scheduler, CFG 1, 4 steps, the family's LCM-LoRA at 0.35); values given
    explicitly always win. ``vae`` names a separate VAE (``autoimport/vae``) to decode
    with; None is the model's default (`models add --vae`), else its own. ``embeddings``
    lists the textual-inversion embeddings the prompts use: filled at submit with every
    embedding whose name is written in a prompt.
    """

    model_config = ConfigDict(extra="forbid")

    job_id: Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern)] | None = None
    batch_id: Annotated[str, StringConstraints(pattern=ID_PATTERN.pattern)] | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    loras: Annotated[list[LoraSpec], Field(max_length=MAX_LORAS)] = []
    prompt: Prompt
    negative_prompt: Prompt = ""
    prompt_syntax: Annotated[
        PromptSyntax,
        Field(
            description="a1111: (word:1.2), [word], BREAK, <lora:NAME:WEIGHT> tags, prompts past 77 tokens "
            "(as A1111 and Forge read them); compel: InvokeAI's syntax (word+, (words)1.2, .blend(), .and())."
        ),
    ] = PromptSyntax.a1111
    sampler: Annotated[
        Sampler,
        Field(description=f"lorafleet's name or A1111's (any case): {samplers.allowed()}"),
    ] = Sampler.euler_a
    lcm: bool = False
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = None
    cfg_scale: (
        Annotated[
            float,
            Field(
                ge=0.0,
                le=MAX_CFG,
                allow_inf_nan=False,
                description="Classifier-free guidance against the negative prompt, with one meaning on every "
                "family: neg + cfg * (pos - neg), so 1 is off. Default by family and sampler (README).",
            ),
        ]
        | None
    ) = None
    guidance: (
        Annotated[
            float,
            Field(
                ge=0.0,
                le=MAX_GUIDANCE,
                allow_inf_nan=False,
                description="Distilled guidance of models that read one (FLUX.1 dev and Krea: Forge's "
                '"Distilled CFG Scale", default 3.5); refused on models without a guidance embedding.',
            ),
        ]
        | None
    ) = None
    width: int | None = None
    height: int | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    clip_skip: Annotated[
        int,
        Field(
            ge=1,
            le=MAX_CLIP_SKIP,
            description="A1111's clip skip: 1 uses the text encoder's last layer, 2 the one before, ... "
            "(SDXL as in diffusers: 1 is its usual penultimate layer, 2 the one before that).",
        ),
    ] = 1
    vae: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    embeddings: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=200)]],
        Field(max_length=MAX_EMBEDDINGS),
    ] = []
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    batch_size: (
        Annotated[
            int,
            Field(
                ge=1,
                le=MAX_BATCH_SIZE,
                description="Rows of every sampling call this job's images run in (filled with other jobs' "
                "images or copies): its pixels depend on it, not on how many jobs shared its calls. None: the "
                "worker's batch size for the model and size. A PNG records it (Batch size) for regeneration.",
            ),
        ]
        | None
    ) = None
    init_image: inputs.InputImage | None = None
    """img2img's starting image (with ``mask_image``: inpainting); its size is the job's default size."""
    mask_image: inputs.InputImage | None = None
    """Inpainting's mask, the init image's size: white is repainted, black kept."""
    strength: inputs.Strength | None = None
    mask_blur: inputs.MaskBlur = inputs.DEFAULT_MASK_BLUR
    inpaint_padding: inputs.InpaintPadding | None = None
    controlnets: Annotated[list[inputs.ControlNetSpec], Field(max_length=inputs.MAX_CONTROLNETS)] = []
    """ControlNets or T2I-Adapters steering the job, each with its control image (autoimport/controlnet)."""
    ip_adapter: inputs.IpAdapterSpec | None = None
    hr_scale: hires.HiresScale | None = None
    hr_upscaler: hires.HiresUpscaler = hires.DEFAULT_UPSCALER
    hr_steps: hires.HiresSteps | None = None
    hr_strength: hires.HiresStrength = hires.DEFAULT_HR_STRENGTH
    lora_mode: (
        Annotated[
            LoraMode,
            Field(
                description="merge: the stack merged into the weights; side: on side paths, sharing calls with "
                "jobs of other stacks (LoRA and LoCon files only). None: the fleet's LORAFLEET_LORA_MODE."
            ),
        ]
        | None
    ) = None
    output_prefix: Annotated[str, StringConstraints(max_length=300)] = "images"
    priority: Priority = Priority.normal
    tags: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=64)],
        Annotated[str, StringConstraints(max_length=256)],
    ] = {}
    webhook_url: Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://")] | None = None
    """POSTed a signed event when the job ends (common/services/webhooks.py)."""

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler_alias(cls, value: Any) -> Any:
        return samplers.from_alias(value) if isinstance(value, str) else value

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        if value is not None and (value < MIN_SIZE or value > MAX_SIZE or value % SIZE_MULTIPLE):
            raise ValueError(
                f"must be a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}, got {value}"
            )
        return value

    @field_validator("output_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not PREFIX_PATTERN.match(value):
            raise ValueError(
                "must be up to 8 '/'-separated segments of letters, digits, '.', '_' "
                "and '-', each starting with a letter or digit"
            )
        return value

    @field_validator("tags")
    @classmethod
    def _tag_count(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, got {len(value)}")
        return value

    @field_validator(
        "mask_image",
        "strength",
        "mask_blur",
        "inpaint_padding",
        "hr_scale",
        "hr_upscaler",
        "hr_steps",
        "hr_strength",
    )
    @classmethod
    def _with_its_field(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "hr_scale":
            if value is not None and any(
                info.data.get(f) for f in ("init_image", "controlnets", "ip_adapter")
            ):
                raise ValueError(
                    "the hires fix is for text-to-image jobs: not with init_image, controlnets or ip_adapter"
                )
            return value
        needed = _NEEDS.get(info.field_name or "", "init_image")
        default = _DEFAULTS[info.field_name or ""]  # a dumped job carries it
        if value is not None and value != default and info.data.get(needed) is None:
            raise ValueError(f"means something only with {needed}, which the job does not give")
        return value

    @model_validator(mode="after")
    def _defaults_by_sampler(self) -> GenerationJob:
        """Defaults by sampler; they stay out of ``model_fields_set``, which keeps saying what
        the producer gave (a flow family's own defaults replace them at submit)."""
        given = {name for name in self.model_fields_set if getattr(self, name) is not None}  # null: not given
        if self.lcm and "sampler" not in self.model_fields_set:
            self.sampler = Sampler.lcm
        lcm = self.sampler.is_lcm
        if self.steps is None:
            self.steps = guidance.LCM_STEPS if lcm else DEFAULT_STEPS
        if self.cfg_scale is None:
            self.cfg_scale = guidance.LCM_CFG if lcm else DEFAULT_CFG
        object.__setattr__(self, "__pydantic_fields_set__", given)
        return self

    def advice(self) -> list[str]:
        """Warnings for settings InvokeAI's LoRA guidance advises against; nothing is changed."""
        notes = []
        if self.sampler.is_lcm:
            if self.steps and self.steps > guidance.LCM_MAX_STEPS_ADVISED:
                notes.append(f"steps={self.steps} under the LCM sampler: LCM is meant for 4-8 steps")
            if self.cfg_scale is not None and self.cfg_scale > guidance.LCM_MAX_CFG_ADVISED:
                notes.append(
                    f"cfg_scale={self.cfg_scale:g} under the LCM sampler: LCM wants CFG about 1 (at most 2)"
                )
        return notes


_DEFAULTS = {name: field.default for name, field in GenerationJob.model_fields.items()}
"""Each field's default, read once: ``GenerationJob.model_fields`` is a property, and
``_with_its_field`` runs eight times in each parse of a record (~3 µs of its ~18)."""


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "job"


RANGES = {
    "steps": f"a whole number from 1 to {MAX_STEPS}",
    "cfg_scale": f"a number from 0 to {MAX_CFG:g}",
    "guidance": f"a number from 0 to {MAX_GUIDANCE:g}",
    "seed": f"a whole number from 0 to {MAX_SEED}",
    "num_images": f"a whole number from 1 to {MAX_IMAGES}",
    "weight": f"a number from {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}",
    "text_encoder_weight": f"a number from {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}",
    "clip_skip": f"a whole number from 1 to {MAX_CLIP_SKIP}",
}
"""What each numeric field allows, for refusals."""
_RANGE_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number"}


def describe_validation_error(exc: ValidationError) -> list[tuple[str, str]]:
    """(field, message) for each problem pydantic found, in words a person can act on."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("function-after", "[key]"))
        field = _field_path(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown field"
            allowed = sorted(GenerationJob.model_fields)
            if len(loc) > 1 and isinstance(loc[-2], int):
                allowed = sorted(LoraSpec.model_fields)
            message += f" (allowed fields: {', '.join(allowed)})"
        elif kind == "string_pattern_mismatch" and loc[-1] in ("init_image", "mask_image"):
            message = f"must be {inputs.IMAGE_REF_ALLOWED}, got {str(err['input'])[:80]!r}"
        elif kind in _RANGE_ERRORS and isinstance(loc[-1], str) and loc[-1] in RANGES:
            message = f"must be {RANGES[loc[-1]]}, got {err['input']!r}"
        else:
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        problems.append((field, message))
    return problems


def parse_job(data: GenerationJob | dict[str, Any], *, where: str = "") -> GenerationJob:
    """Validate ``data`` into a GenerationJob, or raise JobRejected naming every bad field.

    ``where`` prefixes field names (``jobs[3].``) when a job is one of many.
    """
    if isinstance(data, GenerationJob):
        data = data.model_dump(exclude_unset=True)
    if not isinstance(data, dict):
        raise JobRejected(f"a job must be a JSON object, got {type(data).__name__}", field=where or "job")
    try:
        return GenerationJob.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        problems = [(f"{where}{field}", message) for field, message in problems]
        raise JobRejected(
            "; ".join(f"{field}: {message}" for field, message in problems),
            field=problems[0][0],
            problems=problems,
        ) from None


# ---------------------------------------------------------------------------- records


class JobRecord(BaseModel):
    """What became of a job: the one source of truth, kept in Redis."""

    job: GenerationJob
    status: JobStatus = JobStatus.queued
    queue: str = ""
    progress: Progress = Progress()
    submitted_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: Timings = Timings()
    worker: str | None = None
    worker_instance: str | None = None
    """The worker process that runs it (its heartbeat's ``instance``): a restarted worker
    with the same name is another instance."""
    run_id: str | None = None
    """The fencing token of the current run: only the run holding it writes the record."""
    attempts: int = 0
    runs: list[Run] = []
    """Every run of the job, oldest first: one at a time, each closed before the next starts."""
    images: list[ImageRef] = []
    warnings: list[str] = []
    error: str | None = None
    cancel_requested: bool = False
    retry_of: str | None = None
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN.pattern)
    """Who submitted it through the API, when tokens belong to tenants; None: an operator
    (the CLI, the SDK, an admin token, or an API without tokens)."""
    damaged: bool = False
    """The stored record could not be read (see ``damaged_record``); nothing acts on it."""

    @classmethod
    def damaged_record(cls, job_id: str, raw: bytes | str, reason: str) -> JobRecord:
        """What a listing shows for a stored record that does not read back: status failed,
        the reason as its error, and whatever of its model and batch can still be read."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        stored = data.get("job") if isinstance(data, dict) else None
        stored = stored if isinstance(stored, dict) else {}
        salvaged = {k: v for k, v in stored.items() if k in ("model", "batch_id") and isinstance(v, str)}
        job = GenerationJob.model_construct(**{"model": "?", "prompt": ""} | salvaged, job_id=job_id)
        return cls.model_construct(
            job=job,
            status=JobStatus.failed,
            error=f"the record is damaged and cannot be read: {reason}",
            damaged=True,
        )

    @property
    def job_id(self) -> str:
        assert self.job.job_id is not None
        return self.job.job_id

    def to_json(self) -> dict[str, Any]:
        """The record as JSON data with its job id first, as the CLI and the API print it."""
        return {"job_id": self.job_id, **self.model_dump(mode="json")}
