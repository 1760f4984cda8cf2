"""T2I-Adapters: small networks that steer a job by a control image, named like ControlNets.

A T2I-Adapter lives beside the ControlNets (``autoimport/controlnet/``, `lorafleet controlnets
import`), as A1111's ControlNet extension keeps them: a diffusers ``T2IAdapter`` folder
(``config.json`` beside ``diffusion_pytorch_model.safetensors``) or a single .safetensors file
with diffusers' names (``adapter.conv_in``, ``adapter.body.N.resnets.M.block1``; a light
adapter's ``adapter.body.N.in_conv`` / ``out_conv``). TencentARC's original files name their
tensors otherwise (``body.N.block1``, no ``adapter.``); diffusers loads no such file, so they
are refused, saying so.

Semantics (diffusers' ``T2IAdapter``): the control image is pixel-unshuffled by
``downscale_factor`` and run through one block per entry of ``channels``; block i's output is
added to the UNet's down block i (an SDXL adapter's last one to its middle block). So an
adapter fits a model when its feature widths are the model's UNet block widths, and when it is
made for the model's family: ``full_adapter_xl`` for SDXL, ``full_adapter`` and
``light_adapter`` for SD 1.x and 2.x. A single file does not say which type it is: a factor of
16 is diffusers' SDXL adapter, else its SD one. Read without torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.common.catalog.lora_files import TensorInfo
from lorafleet.common.schema.errors import FileRefused

if TYPE_CHECKING:
    from lorafleet.common.catalog.models import ModelRef

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
"""diffusers' T2I-Adapter architectures."""
SDXL_TYPE = "full_adapter_xl"
SDXL_FACTOR = 16
"""The pixel-unshuffle factor of diffusers' SDXL adapters (its SD ones: 8)."""
ALLOWED = (
    "a diffusers T2I-Adapter: a folder (config.json, T2IAdapter) or one .safetensors file with its names"
)
_BODY = re.compile(r"^adapter\.body\.(\d+)\.")


@dataclass(frozen=True)
class AdapterShape:
    """What diffusers' ``T2IAdapter`` is built from, as its config names it."""

    adapter_type: str
    in_channels: int
    channels: tuple[int, ...]
    num_res_blocks: int
    downscale_factor: int

    @property
    def for_sdxl(self) -> bool:
        return self.adapter_type == SDXL_TYPE

    @property
    def feature_widths(self) -> tuple[int, ...]:
        """The width of each feature map it adds to the UNet (a light adapter adds one more)."""
        light = self.adapter_type == "light_adapter"
        return self.channels + (self.channels[-1],) if light else self.channels

    @property
    def total_downscale(self) -> int:
        """How much smaller its last feature map is than the image (equal in one MultiAdapter)."""
        levels = len(self.channels)
        if self.adapter_type == SDXL_TYPE:
            return self.downscale_factor * 2
        return self.downscale_factor * 2 ** (levels if self.adapter_type == "light_adapter" else levels - 1)

    def config(self) -> dict:
        """The keyword arguments of diffusers' ``T2IAdapter``."""
        return asdict(self) | {"channels": list(self.channels)}

    @classmethod
    def from_config(cls, config: Mapping) -> AdapterShape:
        """From a folder's config.json or a registry entry (diffusers' defaults for what it omits);
        ValueError if it is not one."""
        shape = cls(
            adapter_type=config.get("adapter_type", "full_adapter"),
            in_channels=config.get("in_channels", 3),
            channels=tuple(config.get("channels", (320, 640, 1280, 1280))),
            num_res_blocks=config.get("num_res_blocks", 2),
            downscale_factor=config.get("downscale_factor", 8),
        )
        numbers = (shape.in_channels, shape.num_res_blocks, shape.downscale_factor, *shape.channels)
        if shape.adapter_type not in ADAPTER_TYPES or not shape.channels:
            raise ValueError(f"adapter_type {shape.adapter_type!r} with channels {list(shape.channels)}")
        if not all(isinstance(n, int) and n > 0 for n in numbers):
            raise ValueError("its channels, blocks and downscale factor must be positive whole numbers")
        return shape


def is_adapter(keys: Sequence[str]) -> bool:
    """Whether the tensor names are a T2I-Adapter's, in diffusers' layout or TencentARC's."""
    return any(_BODY.match(k) for k in keys) or _original_layout(keys)


def _original_layout(keys: Sequence[str]) -> bool:
    return "conv_in.weight" in keys and any(k.startswith("body.") and ".block1." in k for k in keys)


def adapter_shape(
    path: Path, tensors: Mapping[str, TensorInfo], config: Mapping | None = None
) -> AdapterShape:
    """The shape of the T2I-Adapter whose tensors these are: from a folder's ``config`` when it
    has one, else read from the tensors' names and shapes. FileRefused if diffusers cannot load it."""
    if _original_layout(list(tensors)):
        raise FileRefused(
            "a T2I-Adapter in TencentARC's original layout (body.N.block1, conv_in); diffusers loads "
            "T2I-Adapters only with its own names (adapter.body.N.resnets.M...): convert it with diffusers' "
            "scripts/convert_original_t2i_adapter.py, or use the diffusers release of the adapter",
            field=path.name,
            allowed=ALLOWED,
        )
    if config is not None and config.get("_class_name") == "T2IAdapter":
        try:
            return AdapterShape.from_config(config)
        except (TypeError, ValueError) as exc:
            raise FileRefused(
                f"its config.json is not a T2I-Adapter's: {exc}", field=path.name, allowed=ALLOWED
            )
    try:
        return _read_shape(tensors)
    except (KeyError, ValueError, IndexError) as exc:
        raise FileRefused(
            f"its tensors are not a whole T2I-Adapter in diffusers' layout ({exc})",
            field=path.name,
            allowed=ALLOWED,
        ) from None


def _read_shape(tensors: Mapping[str, TensorInfo]) -> AdapterShape:
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BODY.match(k))})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"its body blocks are numbered {blocks}")
    resnets = {k.split(".")[4] for k in tensors if k.startswith("adapter.body.0.resnets.")}
    light = "adapter.body.0.out_conv.weight" in tensors
    if light:  # each block: in_conv -> resnets -> out_conv; the last adds one more feature map
        outs = [tensors[f"adapter.body.{n}.out_conv.weight"].shape[0] for n in blocks]
        channels, unshuffled = outs[:-1], tensors["adapter.body.0.in_conv.weight"].shape[1]
    else:
        channels = [tensors[f"adapter.body.{n}.resnets.0.block1.weight"].shape[0] for n in blocks]
        unshuffled = tensors["adapter.conv_in.weight"].shape[1]
    in_channels, factor = _unshuffle(unshuffled)
    kind = "light_adapter" if light else SDXL_TYPE if factor == SDXL_FACTOR else "full_adapter"
    return AdapterShape.from_config(
        {
            "adapter_type": kind,
            "in_channels": in_channels,
            "channels": channels,
            "num_res_blocks": len(resnets),
            "downscale_factor": factor,
        }
    )


def _unshuffle(width: int) -> tuple[int, int]:
    """(image channels, factor) whose pixel-unshuffle gives ``width`` channels: 3 (RGB), else 1."""
    for channels in (3, 1):
        side = math.isqrt(width // channels)
        if width % channels == 0 and side * side * channels == width:
            return channels, side
    raise ValueError(f"its first layer reads {width} channels, no pixel-unshuffled RGB or gray image")


def misfit(shape: AdapterShape, sdxl: bool | None, unet_widths: Sequence[int] | None) -> str | None:
    """Why the adapter cannot steer a model (SDXL or not, when known; its UNet's block widths,
    when known), or None when it fits as far as is known."""
    if sdxl is not None and shape.for_sdxl != sdxl:
        made = "SDXL" if shape.for_sdxl else "SD 1.x and 2.x"
        return f"it is made for {made} ({shape.adapter_type}): made for another model family"
    if unet_widths is None:
        return None
    widths, blocks = shape.feature_widths, tuple(unet_widths)
    extra = widths[len(blocks) :]  # an SDXL adapter's last map goes to the middle block
    if widths[: len(blocks)] != blocks or len(extra) > 1 or any(w != blocks[-1] for w in extra):
        return (
            f"its feature maps are {', '.join(map(str, widths))} wide but the model's UNet blocks are "
            f"{', '.join(map(str, blocks))}: made for another model"
        )
    return None


def unet_widths(model: ModelRef) -> tuple[int, ...] | None:
    """The block widths of the model's UNet when its config can be read here (a diffusers
    folder, or a single file's config folder); None otherwise (a hub id, a path only workers see)."""
    for folder in (model.path, Path(model.config) if model.config else None):
        if folder is None or not (folder / "unet" / "config.json").is_file():
            continue
        try:
            widths = json.loads((folder / "unet" / "config.json").read_text()).get("block_out_channels")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(widths, list) and all(isinstance(w, int) for w in widths):
            return tuple(widths)
    return None
