"""Schedulers and the sampling call.

Each job gets a fresh scheduler built from the pipeline's own scheduler config, so one
job's sampler never leaks into the next. Image i of a job uses seed (seed + i) mod 2³²,
drawn from a CPU generator: a job's image i is the same picture as image 0 of a one-image
job with that seed, and the same on every device type. The prompts reach the pipeline as
worker/prompt_encoding.py gives them (text, or embeddings for A1111's syntax).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafleet.common.jobs import GenerationJob, Sampler
from lorafleet.worker.prompt_encoding import prompt_arguments

SEED_MODULUS = 2**32

_TRAILING = {"timestep_spacing": "trailing"}
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[Sampler, tuple[str, dict]] = {
    Sampler.lcm: ("LCMScheduler", {}),
    Sampler.lcm_trailing: ("LCMScheduler", _TRAILING),
    Sampler.euler: ("EulerDiscreteScheduler", {}),
    Sampler.euler_trailing: ("EulerDiscreteScheduler", _TRAILING),
    Sampler.euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.dpmpp_2m: ("DPMSolverMultistepScheduler", _DPMPP_2M),
    Sampler.dpmpp_2m_karras: ("DPMSolverMultistepScheduler", _DPMPP_2M | {"use_karras_sigmas": True}),
    Sampler.dpmpp_2m_sde_karras: (
        "DPMSolverMultistepScheduler",
        _DPMPP_2M | {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    Sampler.dpmpp_sde_karras: ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    Sampler.unipc: ("UniPCMultistepScheduler", {}),
    Sampler.tcd: ("TCDScheduler", {}),
    Sampler.ddim: ("DDIMScheduler", {}),
}
"""diffusers scheduler class and options per sampler."""

_SEEDED_NOISE = {"DPMSolverSDEScheduler"}
"""Schedulers that draw their own noise (a Brownian tree) from a seed in their config,
not from the pipeline's generator: built per image with the image's seed."""


def make_scheduler(sampler: Sampler, base_config: dict, seed: int | None = None):
    import diffusers

    class_name, options = SCHEDULERS[sampler]
    if class_name in _SEEDED_NOISE:
        options = options | {"noise_sampler_seed": seed}
    return getattr(diffusers, class_name).from_config(base_config, **options)


def image_seed(job: GenerationJob, index: int) -> int:
    assert job.seed is not None
    return (job.seed + index) % SEED_MODULUS


def sample(
    pipe,
    scheduler_config: dict,
    job: GenerationJob,
    on_step: Callable[[int], None],
) -> list:
    """The job's images (PIL), one call per image; ``on_step(done)`` after every step.

    ``on_step`` may raise (JobCancelled) to stop sampling at that step.
    """
    steps = job.steps
    assert steps is not None
    prompts = prompt_arguments(pipe, job)
    images = []
    for index in range(job.num_images):
        done_before = index * steps

        def step_end(pipeline, step: int, timestep, kwargs, _base=done_before):
            on_step(_base + step + 1)
            return kwargs

        seed = image_seed(job, index)
        pipe.scheduler = make_scheduler(job.sampler, scheduler_config, seed)
        result = pipe(
            **prompts,
            num_inference_steps=steps,
            guidance_scale=job.cfg_scale,
            width=job.width,
            height=job.height,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=step_end,
        )
        images.append(result.images[0])
    return images
