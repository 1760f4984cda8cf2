"""A1111's hires fix on FLUX.1, Qwen-Image and Z-Image: the second pass's schedule is stretched so
that the family's own image-to-image pipeline runs exactly the Hires steps."""

from __future__ import annotations

from lorafleet.common.schema.hires import image_steps, stretched_steps
from lorafleet.common.schema.jobs import GenerationJob


def test_the_flow_hires_pass_runs_exactly_its_steps():
    """FLUX.1's, Qwen-Image's and Z-Image's image-to-image skip int(total - total x strength) steps."""
    for steps in range(1, 61):
        for strength in (0.05, 0.1, 0.25, 0.3, 0.33, 0.35, 0.5, 0.6, 0.7, 0.75, 0.9, 0.99, 1.0):
            job = GenerationJob(
                model="m", prompt="p", steps=10, hr_scale=2, hr_steps=steps, hr_strength=strength
            )
            total = stretched_steps(job, flow=True)
            assert image_steps(total, strength, flow=True) == steps, (steps, strength, total)
