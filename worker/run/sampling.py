"""Schedulers and the sampling call.

Each call gets a fresh scheduler built from the pipeline's own scheduler config, so one
job's sampler never leaks into the next. Image i of a job uses seed (seed + i) mod 2³²,
drawn from its own CPU generator: a job's image i is the same picture as image 0 of a
one-image job with that seed, and the same on every device type. A call samples a batch of
images (worker/run/batching.py says which), each with its own prompts' embeddings, encoded per
job (``conditioning``) as worker/prompt_encoding.py reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorafleet.common.schema.hires import output_size, stretched_steps
from lorafleet.common.schema.jobs import GenerationJob, Sampler
from lorafleet.worker.prompt_encoding import prompt_arguments
from lorafleet.worker.run import flow, hires
from lorafleet.worker.run.inputs import call_arguments, derived, pipeline_for

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


def text_device(pipe) -> torch.device:
    """Where the pipeline's text encoders are (LORAFLEET_TEXT_ENCODER_DEVICE may keep them apart)."""
    encoder = getattr(pipe, "text_encoder", None)
    return encoder.device if isinstance(encoder, torch.nn.Module) else pipe._execution_device


def denoiser_device(pipe) -> torch.device:
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    return denoiser.device if isinstance(denoiser, torch.nn.Module) else pipe._execution_device


def conditioning(pipe, job: GenerationJob) -> dict[str, torch.Tensor]:
    """The job's prompts as embeddings for one image (batch dimension 1), encoded for this job
    alone, so that they never depend on which jobs share its sampling calls; encoded where the
    text encoders are, and moved to where the denoiser is.

    Semantics: where ``prompt_arguments`` gives text, diffusers' own ``encode_prompt`` encodes
    it exactly as the pipeline would (negative ``None`` kept: SDXL zeroes it); else its
    embeddings as they are. The flow families: worker/run/flow.py.
    """
    target = denoiser_device(pipe)
    if flow.is_flow(pipe):
        return {k: v.to(target) for k, v in flow.conditioning(pipe, job, text_device(pipe)).items()}
    arguments = prompt_arguments(pipe, job)
    if "prompt_embeds" in arguments:
        return {k: v.to(target) for k, v in arguments.items() if v is not None}
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            prompt=arguments["prompt"],
            device=text_device(pipe),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=arguments["negative_prompt"],
        )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:  # SDXL: the pooled embeddings too
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return {name: value.to(target) for name, value in zip(names, encoded)}


def seeds_its_own_noise(sampler: Sampler) -> bool:
    """Whether the sampler draws noise from a seed in its own config (one image per call)."""
    return SCHEDULERS[sampler][0] in _SEEDED_NOISE


def one_image_per_call(job: GenerationJob) -> bool:
    """Whether each image of the job is a call of its own: a sampler that seeds its own noise,
    or "Only masked" inpainting (diffusers crops one image around its mask per call)."""
    return seeds_its_own_noise(job.sampler) or (
        job.mask_image is not None and job.inpaint_padding is not None
    )


def sample(
    pipe,
    scheduler_config: dict,
    job: GenerationJob,
    conditionings: list[dict[str, torch.Tensor]],
    seeds: list[int],
    on_step: Callable[[int], None],
    rows: int = 1,
    output_type: str = "pil",
    inputs: list[dict[str, object]] | None = None,
    controlnet=None,
    upscaler=None,
) -> list:
    """One call of the pipeline for a batch of images (PIL): image i from ``conditionings[i]``
    and its own CPU generator seeded ``seeds[i]``; ``job`` gives what the images share
    (sampler, steps, CFG, size). ``on_step(done)`` after every step; it may raise
    (JobCancelled) to stop the call.

    Semantics: image i's starting noise and every noise draw the sampler makes for it come
    from its own generator, so they are what a one-image call with that seed draws. The call
    has exactly ``rows`` rows: fewer images are filled up with copies of the first, whose
    results are dropped. Kernels choose their arithmetic by shape, so a row's last bits
    depend on the rows of its call, and only on that: never on what the other rows hold
    (worker/run/batching.py).
    """
    assert job.steps is not None and len(conditionings) == len(seeds) >= 1
    if one_image_per_call(job) and rows > 1:
        raise ValueError(f"job {job.job_id}: one image per call (its sampler, or Only masked inpainting)")
    if len(seeds) > rows:
        raise ValueError(f"{len(seeds)} images do not fit a call of {rows} rows")

    def step_end(pipeline, step: int, timestep, kwargs):
        on_step(step + 1)
        return kwargs

    wanted = len(seeds)
    inputs = inputs or [{}] * wanted
    if wanted < rows:
        conditionings = conditionings + [conditionings[0]] * (rows - wanted)
        seeds = seeds + [seeds[0]] * (rows - wanted)
        inputs = inputs + [inputs[0]] * (rows - wanted)
    batch = {name: torch.cat([c[name] for c in conditionings]) for name in conditionings[0]}
    size = {"width": job.width, "height": job.height}
    runner = pipe
    if flow.is_flow(pipe):
        pipe.scheduler = flow.make_scheduler(scheduler_config)
        runner = pipeline_for(pipe, job, controlnet)  # their img2img, inpainting, FLUX.1's ControlNets
        arguments = flow.call_arguments(pipe, job, batch) | call_arguments(job, inputs, runner)
    else:
        pipe.scheduler = make_scheduler(job.sampler, scheduler_config, seeds[0])
        runner = pipeline_for(pipe, job, controlnet)  # over the same components, with this scheduler
        arguments = batch | {"guidance_scale": job.cfg_scale} | call_arguments(job, inputs, runner)
        if job.init_image is not None and job.mask_image is None:
            size = {}  # image-to-image samples at its images' size (the job's: job_inputs)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    first_output = hires.first_output(job) if job.hr_scale else output_type
    progress: dict = {"callback_on_step_end": step_end}
    if getattr(runner, "adapter", None) is not None:  # diffusers' adapter pipelines call back the old way
        progress = {"callback": lambda step, timestep, latents: on_step(step + 1), "callback_steps": 1}
    result = runner(
        **arguments,
        num_inference_steps=job.steps,
        **size,
        generator=generators,
        **progress,
        output_type=first_output,
    )
    if job.hr_scale:  # the second pass over the upscaled images, the generators continued
        second = derived(pipe, "image-to-image")  # on a flow family, the one pipeline_for derives
        if flow.is_flow(pipe):
            second.scheduler = flow.make_scheduler(scheduler_config)
            width, height = output_size(job)  # flow pipelines sample at their width and height
            arguments = flow.call_arguments(pipe, job, batch) | {"width": width, "height": height}
        else:
            second.scheduler = make_scheduler(job.sampler, scheduler_config, seeds[0])
            arguments = batch | {"guidance_scale": job.cfg_scale}
        done = job.steps

        def second_end(pipeline, step: int, timestep, kwargs):
            on_step(done + step + 1)
            return kwargs

        result = second(
            **arguments,
            image=hires.upscaled(pipe, job, result.images, upscaler),
            strength=job.hr_strength,
            num_inference_steps=stretched_steps(job, flow=flow.is_flow(pipe)),  # runs hr_steps, as A1111
            generator=generators,
            callback_on_step_end=second_end,
            output_type=output_type,
        )
    images = list(result.images)[:wanted]
    if job.mask_image is not None and job.inpaint_padding is None and output_type == "pil":
        # A1111's overlay: what the blurred mask keeps is the init image's own pixels (with
        # padding, diffusers overlays its crop itself)
        overlay = runner.image_processor.apply_overlay
        images = [overlay(row["mask_image"], row["image"], image) for image, row in zip(images, inputs)]
    return images
