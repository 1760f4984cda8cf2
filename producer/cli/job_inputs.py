"""The submit command's image options: a file is uploaded for the job, a stored image's
``sha256:`` name is taken as it is; ControlNet and IP-Adapter units written NAME,IMAGE[,...]."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.schema.inputs import IMAGE_REF, IMAGE_REF_ALLOWED


def controlnet_unit(text: str, client: Callable) -> dict[str, Any]:
    """``NAME,IMAGE[,WEIGHT[,START,END]]`` as a job's ControlNet unit."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3, 5) or not all(parts):
        raise BadArgument(f"got {text!r}", field="--controlnet", allowed="NAME,IMAGE[,WEIGHT[,START,END]]")
    unit: dict[str, Any] = {"model": parts[0], "image": image_option(parts[1], "--controlnet", client)}
    try:
        for key, value in zip(("weight", "start", "end"), parts[2:]):
            unit[key] = float(value)
    except ValueError:
        raise BadArgument(
            f"{text!r} has a weight, start or end that is no number", field="--controlnet"
        ) from None
    return unit


def ip_adapter_unit(text: str, client: Callable) -> dict[str, Any]:
    """``NAME,IMAGE[,WEIGHT]`` as a job's IP-Adapter."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3) or not all(parts):
        raise BadArgument(f"got {text!r}", field="--ip-adapter", allowed="NAME,IMAGE[,WEIGHT]")
    unit: dict[str, Any] = {"model": parts[0], "images": [image_option(parts[1], "--ip-adapter", client)]}
    if len(parts) == 3:
        try:
            unit["weight"] = float(parts[2])
        except ValueError:
            raise BadArgument(f"{parts[2]!r} is no number", field="--ip-adapter") from None
    return unit


def image_option(value: str | None, option: str, client: Callable) -> str | None:
    """A stored image's name as it is, or a file uploaded (JobRejected names the option)."""
    if value is None or IMAGE_REF.match(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise BadArgument(
            f"{value!r} is neither a file nor a stored image's name", field=option, allowed=IMAGE_REF_ALLOWED
        )
    return client().upload_image(path, field=option)
