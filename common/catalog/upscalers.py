"""ESRGAN-family upscalers for the hires fix: .safetensors files in ``<home>/autoimport/upscaler/``.

A job names one as its ``hr_upscaler`` (A1111's "Hires upscaler", e.g. ``4x-UltraSharp``) by
its file name; `lorafleet upscalers import` shares a file with every machine. Read without
torch: the file's tensor names and shapes must make the RRDB network of ESRGAN and
Real-ESRGAN (worker/upscalers.py runs it), in any of its three key layouts:

- BasicSR / Real-ESRGAN: ``conv_first``, ``body.N.rdbR.convC``, ``conv_body``, ``conv_upK``,
  ``conv_hr``, ``conv_last``;
- ESRGAN's newer release: ``conv_first``, ``RRDB_trunk.N.RDBR.convC``, ``trunk_conv``,
  ``upconvK``, ``HRconv``, ``conv_last``;
- ESRGAN's original (A1111's "ESRGAN_4x"): ``model.0``, ``model.1.sub.N.RDBR.convC.0``,
  ``model.1.sub.<blocks>``, then the upsampling convs, ``HRconv`` and the last conv by index.

Anything else (another architecture, a pickled .pth) is refused by name; .pth models convert
to .safetensors with their authors' or a hub's safetensors release.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.common.catalog.drop_folder import DropFolder
from lorafleet.common.catalog.lora_files import read_safetensors_header, sha256_file
from lorafleet.common.catalog.shared_files import SharedFile
from lorafleet.common.schema.errors import FileRefused, InvalidInput

MAX_UPSCALER_BYTES = 1024**3
"""Largest upscaler file accepted (a 4x RRDB model is about 67 MB in float32)."""

_RENAMES = (
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^trunk_conv\.(weight|bias)$"), r"conv_body.\1"),
    (re.compile(r"^HRconv\.(weight|bias)$"), r"conv_hr.\1"),
    (re.compile(r"^model\.0\.(weight|bias)$"), r"conv_first.\1"),
)
_UP = re.compile(r"^(?:conv_up|upconv)(\d+)\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_BODY = re.compile(r"^body\.(\d+)\.rdb[123]\.conv[1-5]\.(weight|bias)$")
_UNSHUFFLE = {1: 1, 4: 2, 16: 4}
"""conv_first's input channels over the image's -> the pixel unshuffle (2x and 1x Real-ESRGAN)."""


class UpscalerError(InvalidInput):
    """An upscaler name that names nothing here, or a refused upscaler file."""


@dataclass(frozen=True)
class UpscalerInfo:
    name: str
    path: Path | None
    sha256: str
    shape: dict[str, int]
    """The network's sizes (worker/upscalers.py's RRDBNet arguments)."""
    object_key: str | None = None

    @property
    def scale(self) -> float:
        return 2 ** self.shape["ups"] / self.shape["unshuffle"]


def canonical_keys(names: Iterable[str]) -> dict[str, str]:
    """Each tensor name of an RRDB file -> its BasicSR name (upsampling convs ``ups.K``);
    ValueError for a name no layout has."""
    names = list(names)
    old_top = sorted(
        {int(m.group(1)) for n in names if (m := _OLD_TOP.match(n)) and m.group(1) not in ("0", "1")}
    )
    # the original layout numbers its layers: upsampling convs, then HRconv, then the last conv
    old = {i: f"ups.{k}" for k, i in enumerate(old_top[:-2])}
    if len(old_top) >= 2:
        old |= {old_top[-2]: "conv_hr", old_top[-1]: "conv_last"}
    canonical = {}
    for name in names:
        new = None
        for pattern, replacement in _RENAMES:
            if pattern.match(name):
                new = pattern.sub(replacement, name)
                break
        if new is None and (m := _UP.match(name)):
            new = f"ups.{int(m.group(1)) - 1}.{m.group(2)}"
        if new is None and (m := _OLD_TOP.match(name)) and int(m.group(1)) in old:
            new = f"{old[int(m.group(1))]}.{m.group(2)}"
        if new is None and (m := re.match(r"^model\.1\.sub\.(\d+)\.(weight|bias)$", name)):
            new = f"conv_body.{m.group(2)}"  # the trunk's last conv, after its RRDBs
        if new is None and re.match(
            r"^(conv_first|conv_body|conv_hr|conv_last|body\.\d+\.rdb[123]\.conv[1-5])\.(weight|bias)$", name
        ):
            new = name
        if new is None:
            raise ValueError(f"tensor {name!r} is not part of an ESRGAN (RRDB) network")
        canonical[name] = new
    return canonical


def rrdb_shape(shapes: dict[str, list[int]]) -> dict[str, int]:
    """The RRDBNet sizes of a file's tensors (name -> shape); ValueError if they make none."""
    canonical = canonical_keys(shapes)
    by_new = {new: shapes[old] for old, new in canonical.items()}
    needed = (
        "conv_first.weight",
        "conv_body.weight",
        "conv_hr.weight",
        "conv_last.weight",
        "body.0.rdb1.conv1.weight",
    )
    missing = [n for n in needed if n not in by_new]
    if missing:
        raise ValueError(f"no {', '.join(missing)}: not an ESRGAN (RRDB) network")
    first, last, grow = (
        by_new["conv_first.weight"],
        by_new["conv_last.weight"],
        by_new["body.0.rdb1.conv1.weight"],
    )
    if len(first) != 4 or len(last) != 4 or len(grow) != 4:
        raise ValueError("its convolutions are not 4-dimensional")
    channels = last[0]
    unshuffle = _UNSHUFFLE.get(first[1] // channels) if first[1] % channels == 0 else None
    if unshuffle is None:
        raise ValueError(
            f"conv_first takes {first[1]} channels for {channels}-channel images: not 1x, 4x or 16x"
        )
    blocks = len({m.group(1) for n in by_new if (m := _BODY.match(n))})
    ups = len({n.split(".")[1] for n in by_new if n.startswith("ups.")})
    return {
        "channels": channels,
        "features": first[0],
        "growth": grow[0],
        "blocks": blocks,
        "ups": ups,
        "unshuffle": unshuffle,
    }


def describe_upscaler(path: Path, name: str | None = None) -> UpscalerInfo:
    """The upscaler in ``path``; FileRefused naming what is wrong."""
    header = read_safetensors_header(path, max_bytes=MAX_UPSCALER_BYTES)
    try:
        shape = rrdb_shape({n: list(t.shape) for n, t in header.tensors.items()})
    except ValueError as exc:
        raise FileRefused(
            f"not an ESRGAN-family upscaler: {exc}",
            field=path.name,
            allowed="an ESRGAN or Real-ESRGAN (RRDB) .safetensors model",
        ) from None
    return UpscalerInfo(name or path.stem, path, sha256_file(path), shape)


class UpscalerCatalog(DropFolder[UpscalerInfo]):
    """The upscaler drop folder, then the fleet's registry."""

    noun = "upscaler"
    a_noun = "an upscaler"
    error = UpscalerError
    import_command = "lorafleet upscalers import"

    def _describe(self, path: Path, name: str | None) -> UpscalerInfo:
        return describe_upscaler(path, name)

    def _from_shared(self, entry: SharedFile) -> UpscalerInfo:
        shape: dict[str, Any] = entry.meta.get("shape") or {}
        return UpscalerInfo(
            entry.name, None, entry.sha256, {k: int(v) for k, v in shape.items()}, entry.object_key
        )
