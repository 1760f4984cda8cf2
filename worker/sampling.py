"""Schedulers and the sampling call.

Each job gets a fresh scheduler built from the pipeline's own scheduler config, so one
job's sampler never leaks into the next. Image i of a job uses seed (seed + i) mod 2³²,
drawn from a CPU generator: a job's image i is the same picture as image 0 of a one-image
job with that seed, and the same on every device type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafleet.common.jobs import GenerationJob, Sampler

SEED_MODULUS = 2**32

SCHEDULERS: dict[Sampler, tuple[str, dict]] = {
    Sampler.lcm: ("LCMScheduler", {}),
    Sampler.euler: ("EulerDiscreteScheduler", {}),
    Sampler.euler_a: ("EulerAncestralDiscreteScheduler", {}),
    Sampler.dpmpp_2m: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler.dpmpp_2m_karras: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    Sampler.ddim: ("DDIMScheduler", {}),
}
"""diffusers scheduler class and options per sampler."""

A1111_NAMES = {
    Sampler.lcm: "LCM",
    Sampler.euler: "Euler",
    Sampler.euler_a: "Euler a",
    Sampler.dpmpp_2m: "DPM++ 2M",
    Sampler.dpmpp_2m_karras: "DPM++ 2M Karras",
    Sampler.ddim: "DDIM",
}
"""Sampler names as A1111 writes them in the parameters chunk."""


def make_scheduler(sampler: Sampler, base_config: dict):
    import diffusers

    class_name, options = SCHEDULERS[sampler]
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
    pipe.scheduler = make_scheduler(job.sampler, scheduler_config)
    steps = job.steps
    assert steps is not None
    images = []
    for index in range(job.num_images):
        done_before = index * steps

        def step_end(pipeline, step: int, timestep, kwargs, _base=done_before):
            on_step(_base + step + 1)
            return kwargs

        generator = torch.Generator("cpu").manual_seed(image_seed(job, index))
        result = pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,
            num_inference_steps=steps,
            guidance_scale=job.cfg_scale,
            width=job.width,
            height=job.height,
            generator=generator,
            callback_on_step_end=step_end,
        )
        images.append(result.images[0])
    return images
