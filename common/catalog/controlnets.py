"""ControlNets: the models that steer a job by a control image (an edge map, a pose, a depth map).

A ControlNet is a .safetensors file in ``<home>/autoimport/controlnet/`` (A1111's and
ComfyUI's single files, original names with ``input_hint_block``, or diffusers' names with
``controlnet_cond_embedding``) or a diffusers folder there (``config.json`` beside
``diffusion_pytorch_model.safetensors``), usable by its name; `lorafleet controlnets import`
shares a file with every machine. Read without torch: the width of its cross-attention says
which models it fits (768: SD 1.x, 1024: SD 2.x, 2048: SDXL), checked against the job's model
at submit. T2I-Adapters live here too, as in A1111's ControlNet extension, told apart by their
tensors (no hint block; common/catalog/t2i_adapters.py): their ``kind`` is ``t2i_adapter``.
FLUX.1 ControlNets (diffusers' ``FluxControlNetModel``: ``controlnet_x_embedder`` and
``controlnet_blocks`` tensors) are taken as diffusers folders, their ``family`` ``flux1`` and
their inner width (heads x head size, the FLUX transformer's) recorded; a single FLUX file,
XLabs' original names (``double_blocks``, ``pos_embed_input``) and ControlNet-Union models
(``num_mode``: they need a mode per map) are refused by name.
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
    SafetensorsHeader,
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
_FLUX = ("controlnet_x_embedder.", "controlnet_blocks.")
_XLABS = ("double_blocks.", "pos_embed_input.")
FLUX_FAMILY = "flux1"
"""The family a FLUX ControlNet is for (common/schema/family.py's value)."""
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
    family: str | None = None
    """``flux1`` for a FLUX.1 ControlNet; None: SD's (its ``cross_attention_dim`` says which)."""
    transformer_width: int | None = None
    """A FLUX.1 ControlNet's inner width, the transformer's it is made for."""

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
        if self.family is not None:
            meta |= {"family": self.family, "transformer_width": self.transformer_width}
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
    (its cross-attention width, None) for an SD ControlNet, (None, its shape) for a
    T2I-Adapter; FileRefused if it is neither (a FLUX.1 ControlNet too: ``_describe`` takes those)."""
    header = _header(path)
    if _flux_width(path, header, config) is not None:
        raise FileRefused("a FLUX.1 ControlNet", field=path.name, allowed="an SD ControlNet here")
    return _sd_control(path, header, config)


def _header(path: Path) -> SafetensorsHeader:
    """The file's tensors, read without torch; FileRefused for a pickled or non-.safetensors file."""
    refuse_pickled(path)
    return read_safetensors_header(path, max_bytes=MAX_CONTROLNET_BYTES)


def _sd_control(
    path: Path, header: SafetensorsHeader, config: Path | None
) -> tuple[int | None, AdapterShape | None]:
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


def _flux_width(path: Path, header: SafetensorsHeader, config: Path | None) -> int | None:
    """A FLUX.1 ControlNet's inner width (heads x head size) when ``path`` (its ``header``) is
    the weights of a diffusers ``FluxControlNetModel`` folder (``config``: its config.json);
    None when it is no FLUX ControlNet. FileRefused for a FLUX ControlNet lorafleet does not
    load: a single file (its config is not in it), XLabs' original names, a ControlNet-Union model."""
    keys = list(header.tensors)
    allowed = (
        "a FLUX.1 ControlNet as a diffusers FluxControlNetModel folder (config.json beside "
        f"{DIFFUSERS_WEIGHTS}) in autoimport/controlnet"
    )
    if any(key.startswith(_XLABS) for key in keys):
        raise FileRefused(
            "a FLUX.1 ControlNet with XLabs' original tensor names (double_blocks / pos_embed_input), "
            "which diffusers' FluxControlNetModel does not load",
            field=path.name,
            allowed=allowed,
        )
    if not any(key.startswith(_FLUX) for key in keys):
        return None
    data = _json(config) if config is not None else None
    if data is None:
        raise FileRefused(
            "a FLUX.1 ControlNet as a single file: its config (blocks, heads) is not in it",
            field=path.name,
            allowed=allowed,
        )
    if data.get("_class_name") != "FluxControlNetModel":
        raise FileRefused(
            f"FLUX.1 ControlNet tensors in a folder whose config.json names {data.get('_class_name')!r}",
            field=path.name,
            allowed=allowed,
        )
    if data.get("num_mode") is not None:
        raise FileRefused(
            "a FLUX.1 ControlNet-Union model (num_mode): it needs a control mode per map, which "
            "lorafleet's jobs do not name",
            field=path.name,
            allowed=f"{allowed}, not a Union model",
        )
    heads, size = data.get("num_attention_heads"), data.get("attention_head_dim")
    return heads * size if isinstance(heads, int) and isinstance(size, int) else None


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
        config = None if single else path.parent / "config.json"
        where = path if single else path.parent
        name = name or where.name.removesuffix(SAFETENSORS_SUFFIX)
        header = _header(path)  # read once: FLUX.1's names, then SD's
        flux_width = _flux_width(path, header, config)
        if flux_width is not None or (config is not None and _is_flux_config(config)):
            return ControlNetInfo(
                name, where, False, sha256_file(path), None, family=FLUX_FAMILY, transformer_width=flux_width
            )
        width, adapter = _sd_control(path, header, config)
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
        return ControlNetInfo(
            entry.name,
            None,
            True,
            entry.sha256,
            width,
            entry.object_key,
            adapter,
            entry.meta.get("family"),
            entry.meta.get("transformer_width"),
        )


def _is_flux_config(config: Path) -> bool:
    data = _json(config)
    return data is not None and data.get("_class_name") == "FluxControlNetModel"
