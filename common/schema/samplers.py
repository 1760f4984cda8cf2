"""Samplers a job may ask for, and the names A1111 and Forge write for them.

A job names its sampler by lorafleet's value (``dpmpp_2m_karras``) or by the name A1111
shows (``DPM++ 2M Karras``; any case). A1111 1.9 and later write the sampler and its
schedule in two fields of the parameters chunk (``Sampler: DPM++ 2M, Schedule type:
Karras``); older versions wrote one (``Sampler: DPM++ 2M Karras``); both are read. The
diffusers scheduler behind each sampler is the worker's business (worker/run/sampling.py).
"""

from __future__ import annotations

from enum import Enum


class Sampler(str, Enum):
    """Samplers a job may ask for; names as users type them."""

    lcm = "lcm"
    lcm_trailing = "lcm_trailing"
    euler = "euler"
    euler_trailing = "euler_trailing"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"
    dpmpp_2m_karras = "dpmpp_2m_karras"
    dpmpp_2m_sde_karras = "dpmpp_2m_sde_karras"
    dpmpp_sde_karras = "dpmpp_sde_karras"
    unipc = "unipc"
    tcd = "tcd"
    ddim = "ddim"

    @property
    def is_lcm(self) -> bool:
        """Whether this is the LCM scheduler (InvokeAI's LoRA guidance's recipe applies)."""
        return self in (Sampler.lcm, Sampler.lcm_trailing)


SGM_UNIFORM = "SGM Uniform"
"""A1111's schedule type for trailing timestep spacing (what Lightning, Hyper-SD and Turbo LoRAs need)."""

A1111_NAMES: dict[Sampler, tuple[str, str | None]] = {
    Sampler.lcm: ("LCM", None),
    Sampler.lcm_trailing: ("LCM", SGM_UNIFORM),
    Sampler.euler: ("Euler", None),
    Sampler.euler_trailing: ("Euler", SGM_UNIFORM),
    Sampler.euler_a: ("Euler a", None),
    Sampler.dpmpp_2m: ("DPM++ 2M", "Uniform"),
    Sampler.dpmpp_2m_karras: ("DPM++ 2M", "Karras"),
    Sampler.dpmpp_2m_sde_karras: ("DPM++ 2M SDE", "Karras"),
    Sampler.dpmpp_sde_karras: ("DPM++ SDE", "Karras"),
    Sampler.unipc: ("UniPC", None),
    Sampler.tcd: ("TCD", None),
    Sampler.ddim: ("DDIM", None),
}
"""(Sampler, Schedule type) as A1111 writes them; None where A1111's default schedule is meant."""

AUTOMATIC = "automatic"
"""The schedule type that means "the sampler's own" (A1111 1.9 and later)."""

AUTOMATIC_SCHEDULES = {"dpm++ 2m": Sampler.dpmpp_2m_karras, "dpm++ sde": Sampler.dpmpp_sde_karras}
"""Samplers A1111 1.9 and later give Karras sigmas under the Automatic schedule type (before
1.9 there was no schedule field and "DPM++ 2M" meant uniform sigmas)."""


def _alias(name: str, schedule: str | None) -> str:
    return f"{name} {schedule}".lower() if schedule else name.lower()


ALIASES: dict[str, Sampler] = {
    **{_alias(*names): sampler for sampler, names in A1111_NAMES.items()},
    "dpm++ 2m": Sampler.dpmpp_2m,
    "dpm++ 2m normal": Sampler.dpmpp_2m,
    "euler simple": Sampler.euler,  # Forge's FLUX images: the flow families' own schedule
    **{sampler.value: sampler for sampler in Sampler},
}
"""Every name a job's ``sampler`` accepts, lower-cased, to the sampler it means."""


def from_alias(value: str) -> Sampler:
    """The sampler ``value`` names (lorafleet's name or A1111's, any case), or ValueError."""
    sampler = ALIASES.get(" ".join(value.split()).lower())
    if sampler is None:
        raise ValueError(f"unknown sampler {value!r}; allowed: {allowed()}")
    return sampler


def from_a1111(name: str, schedule: str | None = None) -> Sampler:
    """The sampler an A1111 ``Sampler`` field (and ``Schedule type`` field) mean, or ValueError."""
    name = " ".join(name.split())
    schedule = (schedule or "").strip()
    if not schedule:
        return from_alias(name)
    if schedule.lower() == AUTOMATIC:
        return AUTOMATIC_SCHEDULES.get(name.lower()) or from_alias(name)
    sampler = ALIASES.get(_alias(name, schedule))
    if sampler is None:
        raise ValueError(
            f"sampler {name!r} with schedule type {schedule!r} is not available; allowed: {allowed()}"
        )
    return sampler


def a1111_fields(sampler: Sampler) -> list[tuple[str, str]]:
    """The parameters-chunk fields for ``sampler``: Sampler, and Schedule type where there is one."""
    name, schedule = A1111_NAMES[sampler]
    return [("Sampler", name), *([("Schedule type", schedule)] if schedule else [])]


def allowed() -> str:
    """The sampler names, each with its A1111 name, for messages and docs."""
    return ", ".join(f"{s.value} ({' '.join(filter(None, A1111_NAMES[s]))})" for s in Sampler)
