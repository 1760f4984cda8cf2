"""What the catalog reads of a flow-matching model (FLUX.1, Z-Image, Qwen-Image, FLUX.2):
its default size, its transformer's width, and whether a base fits a transformer-only file."""

from __future__ import annotations

from typing import Protocol

from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.schema.family import Family


class Described(Protocol):
    """What check_base reads of a model (a ModelRef)."""

    family: Family | None
    transformer_width: int | None
    guidance_embeds: bool | None


FLOW_LATENT_SIZE = 128
"""The latent size the flow pipelines sample when given no size (``default_sample_size``)."""


def flow_native_size(vae: dict) -> int | None:
    """What a flow-matching pipeline draws by default: its latent size times the VAE's
    downscale (2 per block after the first; Qwen-Image's VAE: 2 per temporal downsample)."""
    if isinstance(vae.get("temperal_downsample"), list):
        return FLOW_LATENT_SIZE * 2 ** len(vae["temperal_downsample"])
    if isinstance(vae.get("block_out_channels"), list):
        return FLOW_LATENT_SIZE * 2 ** (len(vae["block_out_channels"]) - 1)
    return None


def transformer_width(config: dict) -> int | None:
    """Heads x head size (FLUX.1, FLUX.2, Qwen-Image), or Z-Image's ``dim``."""
    heads, size = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(size, int):
        return heads * size
    return config["dim"] if isinstance(config.get("dim"), int) else None


def check_base(base: str, base_ref: Described, ref: Described, file_name: str) -> None:
    """BadArgument unless the base is of the file's family and variant: the transformer's
    config comes from the base, so its width and guidance embedding must be the file's."""
    problem = None
    if base_ref.family is not None and base_ref.family is not ref.family:
        problem = (
            f"{base!r} is a {base_ref.family.traits.label} model but {file_name} is {ref.family.traits.label}"
        )
    elif (
        base_ref.transformer_width
        and ref.transformer_width
        and base_ref.transformer_width != ref.transformer_width
    ):
        problem = (
            f"{base!r}'s transformer is {base_ref.transformer_width} wide but {file_name}'s is "
            f"{ref.transformer_width} (another variant)"
        )
    elif (
        base_ref.guidance_embeds is not None
        and ref.guidance_embeds is not None
        and base_ref.guidance_embeds != ref.guidance_embeds
    ):
        has = "has" if ref.guidance_embeds else "has no"
        problem = (
            f"{file_name} {has} a guidance embedding and {base!r} does not match it (dev against schnell)"
        )
    if problem:
        label = ref.family.traits.label if ref.family else "matching"
        raise BadArgument(problem, field="--base", allowed=f"a {label} model of the same variant")
