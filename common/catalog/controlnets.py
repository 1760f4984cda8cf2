"""ControlNets: the models that steer a job by a control image (an edge map, a pose, a depth map).

A ControlNet is a .safetensors file in ``<home>/autoimport/controlnet/`` (A1111's and
ComfyUI's single files, original names with ``input_hint_block``, or diffusers' names with
``controlnet_cond_embedding``) or a diffusers folder there (``config.json`` beside
``diffusion_pytorch_model.safetensors``), usable by its name; `lorafleet controlnets import`
shares a file with every machine. Read without torch: a file without a hint block is refused
by name, and the width of its cross-attention says which models it fits (768: SD 1.x, 1024:
SD 2.x, 2048: SDXL), checked against the job's model at submit. Preprocessors (edge detection,
pose estimation) are not lorafleet's: the job's control image is the map itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.drop_folder import FilesOrFolders
from lorafleet.common.catalog.lora_files import (
    SAFETENSORS_SUFFIX,
    read_safetensors_header,
    refuse_pickled,
    sha256_file,
)
from lorafleet.common.catalog.shared_files import SharedFile
from lorafleet.common.schema.errors import FileRefused, InvalidInput

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
MAX_CONTROLNET_BYTES = 6 * 1024**3
"""Largest ControlNet file accepted (an fp32 SDXL ControlNet is about 5 GB)."""
_HINT = ("controlnet_cond_embedding.", "input_hint_block.")


class ControlNetError(InvalidInput):
    """A ControlNet name that names nothing here, or a refused ControlNet file."""


@dataclass(frozen=True)
class ControlNetInfo:
    name: str
    path: Path | None
    single_file: bool
    sha256: str
    cross_attention_dim: int | None
    object_key: str | None = None

    @property
    def weights(self) -> Path | None:
        if self.path is None or self.single_file:
            return self.path
        return self.path / DIFFUSERS_WEIGHTS

    @property
    def short_hash(self) -> str:
        """What A1111 writes in brackets after a ControlNet's name: 8 hex digits of its sha256."""
        return self.sha256[:8]


def controlnet_width(path: Path) -> int | None:
    """The cross-attention width of the ControlNet in ``path``; FileRefused if it is none."""
    refuse_pickled(path)
    header = read_safetensors_header(path, max_bytes=MAX_CONTROLNET_BYTES)
    if not any(part in key for key in header.tensors for part in _HINT):
        raise FileRefused(
            "not a ControlNet: it has no hint block (controlnet_cond_embedding / input_hint_block)",
            field=path.name,
            allowed="a ControlNet .safetensors file or a diffusers ControlNet folder",
        )
    widths = {
        t.shape[1] for k, t in header.tensors.items() if k.endswith("attn2.to_k.weight") and len(t.shape) == 2
    }
    return widths.pop() if len(widths) == 1 else None


class ControlNetCatalog(FilesOrFolders[ControlNetInfo]):
    """The ControlNet drop folder, then the fleet's registry."""

    noun = "ControlNet"
    a_noun = "a ControlNet"
    error = ControlNetError
    local_kind = f"a {SAFETENSORS_SUFFIX} file or a diffusers ControlNet folder"
    import_command = "lorafleet controlnets import"

    def _describe(self, path: Path, name: str | None) -> ControlNetInfo:
        width = controlnet_width(path)
        single = path.parent == self.folder
        where = path if single else path.parent
        return ControlNetInfo(
            name or where.name.removesuffix(SAFETENSORS_SUFFIX), where, single, sha256_file(path), width
        )

    def _from_shared(self, entry: SharedFile) -> ControlNetInfo:
        return ControlNetInfo(
            entry.name, None, True, entry.sha256, entry.meta.get("cross_attention_dim"), entry.object_key
        )
