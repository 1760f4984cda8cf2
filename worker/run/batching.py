"""Which images share a sampling call, and how many fit in one.

A worker samples several images per UNet call: a job's own images, and the images of the
compatible jobs waiting behind it in its queue (Celery hands a worker up to ``max_batch``
messages ahead; ``JobRunner.run`` takes the compatible ones along). Jobs are compatible when
everything that shapes the call is the same (``batch_key``): model, LoRA stack and weights,
sampler, steps, CFG, distilled guidance, size, VAE and embeddings. Prompts and seeds may differ: each image has
its own embeddings and its own generator.

The images of a group are cut into calls of one fixed number of rows, the batch size, and a
call with fewer images is filled up with copies of its first: a job's pixels depend on the
batch size, never on how many jobs shared its calls. (Kernels pick their arithmetic by shape:
on this project's CPU a one-row call, a two- or three-row one and a call of four or more
differ in the last bits, enough to flip a pixel by 1/255. At some row counts, 5 to 7 and 9
here, a few-row product also rounds a row by its position in the call: the defaults stay on
the counts that do not; docs/benchmarks.md, bench/batch_determinism.py.) The batch size is the job's own
``batch_size`` (a regenerated PNG's), else ``LORAFLEET_MAX_BATCH``, else (0, the default)
one derived from the device's total memory and the image size (``default_max_batch``): the
same on every run of a machine, and written into every PNG. A call that runs out of memory is
tried again at half the size, and the size that fit is remembered per model and image size
(``BatchSizes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from lorafleet.common.schema.hires import output_size
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, JobStatus, LoraMode, Timings
from lorafleet.worker.run.sampling import one_image_per_call

BYTES_PER_PIXEL = 3 * 1024
"""Device memory one image of a batch takes per output pixel while it samples (activations,
latents, VAE decode; fp16, SD 1.5 to SDXL, measured loosely): 512x512 is about 0.8 GB."""
MEMORY_SHARE = 0.6
"""Share of the free memory the default batch size may plan to use."""
MAX_DEFAULT_BATCH = 16
"""The default batch size never goes beyond this, however much memory is free."""
CALL_PIXELS = 4 * 512 * 512
"""The default's pixels per call: every call has the batch size's rows, so a lone job pays for
the copies filling it; past about a megapixel a call keeps a large GPU busy by itself (SDXL at
1024² is nearly compute-bound at one image), so bigger images get fewer rows: 4 at 512², 1 at
1024². LORAFLEET_MAX_BATCH sets any size."""
CPU_DEFAULT_BATCH = 4
"""The default's ceiling on a CPU: there a call costs almost in proportion to its rows, so a
bigger one buys little (tiny models aside) while a lone job pays for every copy filling it."""


def stack_key(job: GenerationJob) -> tuple:
    """The job's LoRA stack: names, files and weights, in order."""
    return tuple((s.name, s.sha256, s.weight, s.text_encoder_weight) for s in job.loras)


def batch_key(job: GenerationJob) -> tuple:
    """Everything that must be equal for two jobs to share a sampling call (on side paths
    every row takes its own stack: then the stack is not part of it)."""
    return (
        job.model,
        ("side paths",) if job.lora_mode is LoraMode.side else stack_key(job),
        job.sampler,
        job.steps,
        job.cfg_scale,
        job.guidance,
        job.width,
        job.height,
        job.vae,
        tuple(job.embeddings),
        job.batch_size,
        job.lora_mode,
        # images in: each row its own images, the rest shared (img2img and inpainting apart)
        job.init_image is not None,
        job.mask_image is not None,
        job.strength,
        job.inpaint_padding,
        tuple((c.model, c.weight, c.start, c.end) for c in job.controlnets),  # the maps: per row
        (job.hr_scale, job.hr_upscaler, job.hr_steps, job.hr_strength) if job.hr_scale else None,
        job.ip_adapter.model_dump_json() if job.ip_adapter else None,  # one image prompt per call
    )


def default_max_batch(device: torch.device, width: int, height: int) -> int:
    """Images per call that fit in MEMORY_SHARE of the device's total memory at this size.
    Total, not free: the batch size shapes the pixels, so it must not move with the memory
    other processes hold at the moment (a size that does not fit is halved, and remembered)."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        ceiling = MAX_DEFAULT_BATCH
    else:
        total = _total_memory()
        ceiling = CPU_DEFAULT_BATCH
    fits = int(total * MEMORY_SHARE) // (width * height * BYTES_PER_PIXEL)
    return max(1, min(ceiling, fits, CALL_PIXELS // (width * height)))


def _total_memory() -> int:
    """Bytes of the machine's memory (MemTotal)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class BatchSizes:
    """The batch size for a model and image size: the setting, or the default, or the size
    an out-of-memory error last halved it to."""

    def __init__(self, setting: int, device: torch.device) -> None:
        self.setting = setting
        self.device = device
        self._fits: dict[tuple[str, int, int], int] = {}

    def get(self, model: str, width: int, height: int) -> int:
        """The worker's batch size for the model and image size (a job's own ``batch_size``
        overrides it: ``rows``)."""
        remembered = self._fits.get((model, width, height))
        if remembered is not None:
            return remembered
        return self.setting or default_max_batch(self.device, width, height)

    def rows(self, job: GenerationJob) -> int:
        """Rows of every sampling call of the job (and of the jobs sampled with it): one where
        each image is a call of its own (``one_image_per_call``), else the job's batch size or the worker's."""
        if one_image_per_call(job):
            return 1
        width, height = output_size(job)  # the hires fix's second pass is the larger one
        return job.batch_size or self.get(job.model, width, height)

    def halve(self, model: str, width: int, height: int, size: int) -> int:
        """After an out-of-memory error at ``size``: the size to try next (0: none left)."""
        smaller = size // 2
        if smaller >= 1:
            self._fits[(model, width, height)] = smaller
        return smaller


@dataclass(eq=False)
class Member:
    """One job of a group and its images' share of the sampling."""

    record: JobRecord
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: dict[str, object] = field(default_factory=dict)
    """Its init image (and mask) as its rows take them (worker/run/inputs.py)."""
    images: dict[int, object] = field(default_factory=dict)
    """Image index -> PIL image, as its chunk finishes."""
    cancelled: bool = False
    """Cancelled (or taken over by another run) while it sampled: its images are dropped."""
    rows: dict[int, int] = field(default_factory=dict)
    """Image index -> rows of the call it was sampled in (its PNG's Batch size)."""
    warnings: list[str] = field(default_factory=list)
    ended: JobStatus | None = None
    """How the job ended when it left its group before sampling (its stack refused)."""

    def __post_init__(self) -> None:
        self.warnings = list(self.record.warnings)

    @property
    def timings(self) -> Timings:
        return self.record.timings

    @property
    def sampled(self) -> int:
        return len(self.images)

    @property
    def complete(self) -> bool:
        return len(self.images) == self.job.num_images

    @property
    def job(self) -> GenerationJob:
        return self.record.job

    @property
    def job_id(self) -> str:
        return self.record.job_id

    @property
    def signature(self) -> tuple:
        """The embeddings' shapes: only members with equal ones can be stacked in one call."""
        return tuple((name, tuple(t.shape[1:])) for name, t in sorted(self.conditioning.items()))


@dataclass(frozen=True)
class Slot:
    """Image ``index`` of a member, in a chunk."""

    member: Member
    index: int


def chunks(members: list[Member], size: int, one_per_call: bool) -> list[list[Slot]]:
    """The images still to sample, cut into chunks of at most ``size`` images of members with
    equal embedding shapes (one image per chunk when ``one_per_call``); cancelled members
    and images already sampled are left out."""
    by_signature: dict[tuple, list[Slot]] = {}
    for member in members:
        if member.cancelled:
            continue
        by_signature.setdefault(member.signature, []).extend(
            Slot(member, i) for i in range(member.job.num_images) if i not in member.images
        )
    step = 1 if one_per_call else max(1, size)
    return [slots[i : i + step] for slots in by_signature.values() for i in range(0, len(slots), step)]
