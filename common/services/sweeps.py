"""Sweeps: a base job and up to three axes (X, Y, Z), expanded into one batch, judged on a grid.

Each axis varies one thing::

    prompt          values: prompts
    seed            values: seeds, or count: N (the base seed and the N-1 after it)
    sampler, steps, cfg_scale, model
                    values: what the job field takes
    lora:NAME       values: weights of LoRA NAME (added to the stack if the base lacks it)
    lora:NAME:te    values: its text-encoder weights
    lora            values: LoRA names (training epochs, say), each added to the base stack at
                    the axis's ``weight``
    strength        values: denoising strengths (with an init image)
    init_image      values: stored input images (``sha256:...``; the CLI uploads files and the
                    images of a folder for you and labels them by file name)

``expand`` makes every combination a job (validated by the same resolver as any submit, all
or none), tagged ``sweep.x`` / ``sweep.y`` / ``sweep.z`` with its labels. The sweep's layout is
kept in Redis (``keys.sweep``) for its grid and for ``lorafleet fetch``; when the batch's last
job has ended, the services loop draws the labelled grid (services/batches.py, grids.py;
``worker``-free: PIL) and stores it beside the images (``<prefix>/<batch_id>/grid-<z>.png``,
one page per Z value).
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import redis
from pydantic import BaseModel, Field, model_validator

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected

AXIS_NAMES = ("prompt", "seed", "sampler", "steps", "cfg_scale", "model", "lora", "strength", "init_image")
LABEL_CHARS = 60
"""A label longer than this is cut with an ellipsis on the grid and in the tags."""


class Axis(BaseModel):
    """One thing a sweep varies, and its values."""

    name: str = Field(
        description="prompt, seed, sampler, steps, cfg_scale, model, lora, lora:NAME or lora:NAME:te"
    )
    values: list[Any] = []
    count: int | None = Field(default=None, ge=1, le=1000, description="seed only: this many seeds")
    weight: float = Field(
        default=0.75, ge=-4, le=4, description="lora only: the weight each LoRA is added at"
    )
    labels: list[str] | None = Field(
        default=None, description="What the grid and the tags call each value (default: the value itself)."
    )

    @model_validator(mode="after")
    def _known(self) -> Axis:
        kind = self.name.split(":")[0]
        if kind not in AXIS_NAMES or (kind != "lora" and ":" in self.name) or self.name.count(":") > 2:
            raise ValueError(
                f"{self.name!r} is not an axis; allowed: {', '.join(AXIS_NAMES)}, lora:NAME, lora:NAME:te"
            )
        if self.name.count(":") == 2 and not self.name.endswith(":te"):
            raise ValueError(f"{self.name!r}: the third part can only be te (lora:NAME:te)")
        if self.count is not None and self.name != "seed":
            raise ValueError("count is for the seed axis only")
        if not self.values and self.count is None:
            raise ValueError(f"axis {self.name!r} has no values")
        if self.labels is not None and len(self.labels) != len(self.values):
            raise ValueError(f"{len(self.labels)} labels for {len(self.values)} values")
        return self


class SweepSpec(BaseModel):
    """A base job and its axes: ``x`` (columns), ``y`` (rows), ``z`` (pages)."""

    base: dict[str, Any]
    x: Axis
    y: Axis | None = None
    z: Axis | None = None


def _label(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str) and value.startswith("sha256:"):  # a stored image: its short hash
        text = value[len("sha256:") :][:10]
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _labels(axis: Axis, values: list[Any]) -> list[str]:
    return [_label(v) for v in (axis.labels if axis.labels is not None else values)]


def _values(axis: Axis, base: dict[str, Any]) -> list[Any]:
    if axis.count is not None:
        start = int(base.get("seed") or 0)
        return [(start + i) % 2**32 for i in range(axis.count)]
    return list(axis.values)


def _apply(job: dict[str, Any], axis: Axis, value: Any) -> None:
    parts = axis.name.split(":")
    if parts[0] != "lora":
        job[axis.name] = value
        return
    loras = [dict(spec) for spec in job.get("loras", [])]
    if len(parts) == 1:
        loras.append({"name": str(value), "weight": axis.weight})
    else:
        spec = next((s for s in loras if s.get("name") == parts[1]), None)
        if spec is None:
            spec = {"name": parts[1]}
            loras.append(spec)
        spec["text_encoder_weight" if len(parts) == 3 else "weight"] = value
    job["loras"] = loras


def expand(spec: SweepSpec, cap: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the jobs, the layout: each axis's name and labels); JobRejected past ``cap`` jobs."""
    axes = [a for a in (spec.x, spec.y, spec.z) if a is not None]
    values = [_values(a, spec.base) for a in axes]
    total = 1
    for v in values:
        total *= len(v)
    if total > cap:
        raise JobRejected(
            f"the sweep makes {total} jobs",
            field="sweep",
            allowed=f"at most {cap} (LORAFLEET_MAX_JOBS_PER_SUBMIT)",
        )
    labels = [_labels(a, v) for a, v in zip(axes, values)]
    jobs = []
    for combo in itertools.product(*[range(len(v)) for v in values]):
        job = json.loads(json.dumps(spec.base))  # a deep copy
        tags = dict(job.get("tags", {}))
        for letter, axis, vals, names, index in zip("xyz", axes, values, labels, combo):
            _apply(job, axis, vals[index])
            tags[f"sweep.{letter}"] = names[index]
            tags[f"sweep.{letter}.index"] = str(index)
        job["tags"] = tags
        jobs.append(job)
    layout = [{"axis": a.name, "labels": names} for a, names in zip(axes, labels)]
    return jobs, layout


def save_layout(client: redis.Redis, batch_id: str, layout: list[dict], prefix: str, keep: int) -> None:
    client.set(keys.sweep(batch_id), json.dumps({"axes": layout, "prefix": prefix, "grids": []}), ex=keep)


def read_layout(client: redis.Redis, batch_id: str) -> dict | None:
    raw = client.get(keys.sweep(batch_id))
    return json.loads(raw) if raw else None
