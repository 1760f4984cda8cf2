"""Separate VAE files: the decoders people swap in (``sdxl_vae.safetensors``, ``vae-ft-mse``).

A VAE is a .safetensors file in ``<home>/autoimport/vae/`` (the original single-file layout,
``encoder.down.0.block...``, with or without ``first_stage_model.``, or diffusers' names) or
a diffusers folder there (``config.json`` beside ``diffusion_pytorch_model.safetensors``),
usable by its name. A registered model may name a default VAE (`models add --vae`); a job
names one in its ``vae`` field. Read without torch: a file that is no VAE is refused by name.
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
from lorafleet.common.schema.errors import FileRefused, VaeError

DIFFUSERS_VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
MAX_VAE_BYTES = 2 * 1024**3
"""Largest VAE file accepted (an fp32 SD VAE is 335 MB)."""
_DECODER_OUT = (
    "decoder.conv_out.weight",
    "first_stage_model.decoder.conv_out.weight",
    "vae.decoder.conv_out.weight",
)


@dataclass(frozen=True)
class VaeInfo:
    """A VAE: its name, where it is (a file, or a diffusers folder), and its weights' sha256."""

    name: str
    path: Path | None
    single_file: bool
    sha256: str
    object_key: str | None = None
    """For a VAE known only from the shared registry: its object in the store."""

    @property
    def weights(self) -> Path | None:
        """The file that holds the weights: the VAE file itself, or the folder's weights file."""
        if self.path is None or self.single_file:
            return self.path
        return self.path / DIFFUSERS_VAE_WEIGHTS

    @property
    def short_hash(self) -> str:
        """A1111's "VAE hash": the first 10 hex digits of the weights' sha256."""
        return self.sha256[:10]

    @property
    def file_name(self) -> str:
        """How A1111 names it in the parameters chunk (``VAE: sdxl_vae.safetensors``)."""
        return f"{self.name}{SAFETENSORS_SUFFIX}" if self.single_file else self.name


def check_vae_file(path: Path) -> None:
    """FileRefused unless ``path`` is a safetensors file with a VAE decoder in it."""
    refuse_pickled(path)
    header = read_safetensors_header(path, max_bytes=MAX_VAE_BYTES)
    out = next((header.tensors[k] for k in _DECODER_OUT if k in header.tensors), None)
    if out is None:
        raise FileRefused(
            "not a VAE: it has no decoder.conv_out",
            field=path.name,
            allowed="a VAE .safetensors file or a diffusers VAE folder",
        )
    if out.shape[:1] != (3,):
        raise FileRefused(f"its decoder writes {out.shape[0]} channels, not RGB", field=path.name)


class VaeCatalog(FilesOrFolders[VaeInfo]):
    """The VAE drop folder: names to files or diffusers folders, each checked when looked up
    (once per size and mtime of its weights)."""

    noun = "VAE"
    a_noun = "a VAE"
    error = VaeError
    local_kind = f"a {SAFETENSORS_SUFFIX} file or a diffusers VAE folder"
    import_command = "lorafleet vaes import"

    def _describe(self, path: Path, name: str | None) -> VaeInfo:
        # ``path`` holds the weights: the VAE file itself, or the file inside a diffusers folder
        check_vae_file(path)
        single = path.parent == self.folder
        where = path if single else path.parent
        return VaeInfo(name or where.name.removesuffix(SAFETENSORS_SUFFIX), where, single, sha256_file(path))

    def _from_shared(self, entry: SharedFile) -> VaeInfo:
        return VaeInfo(entry.name, None, True, entry.sha256, entry.object_key)
