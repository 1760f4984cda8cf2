"""ControlNets: the models that steer a job by a control image (an edge map, a pose, a depth map).

A ControlNet is a .safetensors file in ``<home>/autoimport/controlnet/`` (A1111's and
ComfyUI's single files, original names with ``input_hint_block``, or diffusers' names with
``controlnet_cond_embedding``) or a diffusers folder there (``config.json`` beside
``diffusion_pytorch_model.safetensors``), usable by its name; `lorafleet controlnets import`
shares a file with every machine. Read without torch: the width of its cross-attention says
which models it fits (768: SD 1.x, 1024: SD 2.x, 2048: SDXL), checked against the job's model
at submit. T2I-Adapters live here too, as in A1111's ControlNet extension, told apart by their
tensors (no hint block; common/catalog/t2i_adapters.py): their ``kind`` is ``t2i_adapter``.
A file that is neither is refused by name. Preprocessors (edge detection, pose estimation) are
not lorafleet's: the job's control image is the map itself.
"""

from __future__ import annotations

import json
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
from lorafleet.common.catalog.t2i_adapters import AdapterShape, adapter_shape, is_adapter
from lorafleet.common.schema.errors import FileRefused, InvalidInput

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
MAX_CONTROLNET_BYTES = 6 * 1024**3
"""Largest ControlNet file accepted (an fp32 SDXL ControlNet is about 5 GB)."""
_HINT = ("controlnet_cond_embedding.", "input_hint_block.")
CONTROLNET, T2I_ADAPTER = "controlnet", "t2i_adapter"
"""The kinds of model in the ControlNet folder."""


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
    adapter: AdapterShape | None = None
    """A T2I-Adapter's shape (None: a ControlNet)."""

    @property
    def kind(self) -> str:
        """``controlnet`` or ``t2i_adapter``."""
        return CONTROLNET if self.adapter is None else T2I_ADAPTER

    @property
    def noun(self) -> str:
        """What messages call it."""
        return "ControlNet" if self.adapter is None else "T2I-Adapter"

    def meta(self) -> dict:
        """What the shared registry keeps beside its file."""
        meta: dict = {"kind": self.kind, "cross_attention_dim": self.cross_attention_dim}
        return meta | ({"adapter": self.adapter.config()} if self.adapter is not None else {})

    @property
    def weights(self) -> Path | None:
        if self.path is None or self.single_file:
            return self.path
        return self.path / DIFFUSERS_WEIGHTS

    @property
    def short_hash(self) -> str:
        """What A1111 writes in brackets after a ControlNet's name: 8 hex digits of its sha256."""
        return self.sha256[:8]


def read_control(path: Path, config: Path | None = None) -> tuple[int | None, AdapterShape | None]:
    """What the ControlNet folder's file ``path`` is (``config``: its folder's config.json):
    (its cross-attention width, None) for a ControlNet, (None, its shape) for a T2I-Adapter;
    FileRefused if it is neither."""
    refuse_pickled(path)
    header = read_safetensors_header(path, max_bytes=MAX_CONTROLNET_BYTES)
    hinted = any(part in key for key in header.tensors for part in _HINT)
    if not hinted and is_adapter(list(header.tensors)):
        return None, adapter_shape(path, header.tensors, _json(config) if config is not None else None)
    if not hinted:
        raise FileRefused(
            "not a ControlNet or a T2I-Adapter: it has no hint block (controlnet_cond_embedding / "
            "input_hint_block) and no adapter body",
            field=path.name,
            allowed="a ControlNet or T2I-Adapter .safetensors file, or a diffusers folder of one",
        )
    widths = {
        t.shape[1] for k, t in header.tensors.items() if k.endswith("attn2.to_k.weight") and len(t.shape) == 2
    }
    return (widths.pop() if len(widths) == 1 else None), None


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ControlNetCatalog(FilesOrFolders[ControlNetInfo]):
    """The ControlNet drop folder, then the fleet's registry."""

    noun = "ControlNet"
    a_noun = "a ControlNet"
    error = ControlNetError
    local_kind = f"a {SAFETENSORS_SUFFIX} file or a diffusers ControlNet or T2I-Adapter folder"
    import_command = "lorafleet controlnets import"

    def _describe(self, path: Path, name: str | None) -> ControlNetInfo:
        single = path.parent == self.folder
        width, adapter = read_control(path, None if single else path.parent / "config.json")
        where = path if single else path.parent
        name = name or where.name.removesuffix(SAFETENSORS_SUFFIX)
        return ControlNetInfo(name, where, single, sha256_file(path), width, adapter=adapter)

    def _from_shared(self, entry: SharedFile) -> ControlNetInfo:
        adapter = None
        if entry.meta.get("kind") == T2I_ADAPTER:
            try:
                adapter = AdapterShape.from_config(entry.meta.get("adapter"))
            except (AttributeError, TypeError, ValueError) as exc:
                raise self.error(
                    f"T2I-Adapter {entry.name!r} has a damaged registry entry ({exc})",
                    allowed=f"import its file again with `{self.import_command}`",
                ) from None
        width = entry.meta.get("cross_attention_dim")
        return ControlNetInfo(entry.name, None, True, entry.sha256, width, entry.object_key, adapter)
