"""IP-Adapters: an image prompt beside the text one (keep a face, a product, a style across a sweep).

An IP-Adapter is a folder in ``<home>/autoimport/ip_adapter/`` laid out as the published ones
are (h94/IP-Adapter's ``models/``): its weights, one .safetensors file with ``image_proj.`` and
``ip_adapter.`` tensors, beside the CLIP image encoder it was trained with, a diffusers/
transformers folder ``image_encoder/``. Read without torch: a folder without both is refused
naming what is missing, and the width of its image-to-text projection says which models it
fits (checked against the job's model at submit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.lora_files import SAFETENSORS_SUFFIX, read_safetensors_header, sha256_file
from lorafleet.common.schema.errors import FileRefused, InvalidInput
from lorafleet.common.schema.jobs import check_lora_name

MAX_IP_ADAPTER_BYTES = 4 * 1024**3
ENCODER = "image_encoder"


class IpAdapterError(InvalidInput):
    """An IP-Adapter name that names nothing here, or a folder that is no IP-Adapter."""


@dataclass(frozen=True)
class IpAdapterInfo:
    name: str
    path: Path
    """The folder: the weights file and ``image_encoder/``."""
    weights_name: str
    sha256: str
    cross_attention_dim: int | None

    @property
    def short_hash(self) -> str:
        return self.sha256[:8]


def describe_ip_adapter(folder: Path) -> IpAdapterInfo:
    """Check an IP-Adapter folder and describe it; FileRefused names what is wrong."""
    files = sorted(p for p in folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())
    weights = []
    for file in files:
        tensors = read_safetensors_header(file, max_bytes=MAX_IP_ADAPTER_BYTES).tensors
        if any(k.startswith("image_proj.") for k in tensors) and any(
            k.startswith("ip_adapter.") for k in tensors
        ):
            weights.append((file, tensors))
    allowed = f"a folder with one IP-Adapter .safetensors file (image_proj., ip_adapter.) and {ENCODER}/"
    if len(weights) != 1:
        found = "no" if not weights else f"{len(weights)}"
        raise FileRefused(f"{found} IP-Adapter weights files in it", field=folder.name, allowed=allowed)
    if not (folder / ENCODER / "config.json").is_file():
        raise FileRefused(f"no {ENCODER}/ beside its weights", field=folder.name, allowed=allowed)
    file, tensors = weights[0]
    if any("lora" in k for k in tensors if k.startswith("ip_adapter.")):
        raise FileRefused(
            "a FaceID IP-Adapter: its LoRA would stay in the model after the job",
            field=folder.name,
            allowed="a plain IP-Adapter (image_proj and ip_adapter tensors only)",
        )
    widths = {t.shape[1] for k, t in tensors.items() if k.endswith("to_k_ip.weight") and len(t.shape) == 2}
    return IpAdapterInfo(
        folder.name, folder, file.name, sha256_file(file), widths.pop() if len(widths) == 1 else None
    )


def _stamp(folder: Path, weights_name: str) -> tuple[int, int, int] | None:
    """What says an IP-Adapter folder is as it was described: the folder's mtime (a file added,
    removed or renamed in it) and its weights file's size and mtime; None if either is gone."""
    try:
        weights = (folder / weights_name).stat()
        return folder.stat().st_mtime_ns, weights.st_size, weights.st_mtime_ns
    except OSError:
        return None


class IpAdapterCatalog:
    """The IP-Adapter drop folder, by folder name; each folder described once per change
    (``_stamp``: two stats a lookup, the folder listed and hashed again only when it changed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._described: dict[Path, tuple[tuple[int, int, int] | None, IpAdapterInfo]] = {}

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir())

    def get(self, name: str) -> IpAdapterInfo:
        try:
            check_lora_name(name)
        except ValueError as exc:
            raise IpAdapterError(str(exc)) from None
        folder = self.folder / name
        cached = self._described.get(folder)
        if (
            cached is not None
            and cached[0] is not None
            and cached[0] == _stamp(folder, cached[1].weights_name)
        ):
            return cached[1]
        if not folder.is_dir():
            known = ", ".join(self.names()) or f"none yet: put IP-Adapter folders in {self.folder}"
            raise IpAdapterError(f"unknown IP-Adapter {name!r}", allowed=f"an IP-Adapter folder ({known})")
        # stamped before they are read: a file rewritten while it is hashed is described again
        stamps = {p.name: _stamp(folder, p.name) for p in folder.glob(f"*{SAFETENSORS_SUFFIX}")}
        try:
            info = describe_ip_adapter(folder)
        except FileRefused as exc:
            raise IpAdapterError(
                f"IP-Adapter {name!r} is refused: {exc.reason}", allowed=exc.allowed
            ) from None
        except OSError as exc:
            raise IpAdapterError(f"IP-Adapter {name!r} cannot be read: {exc.strerror or exc}") from None
        self._described[folder] = (stamps.get(info.weights_name), info)
        return info
