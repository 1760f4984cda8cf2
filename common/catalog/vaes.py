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

from lorafleet.common.catalog.lora_files import (
    PICKLED_SUFFIXES,
    SAFETENSORS_SUFFIX,
    read_safetensors_header,
    refuse_pickled,
    sha256_file,
)
from lorafleet.common.catalog.shared_files import SharedFiles
from lorafleet.common.schema.errors import FileRefused, VaeError
from lorafleet.common.schema.jobs import check_lora_name

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


class VaeCatalog:
    """The VAE drop folder: names to files or folders, each checked when looked up."""

    def __init__(self, folder: Path, shared: SharedFiles | None = None) -> None:
        self.folder = Path(folder)
        self.shared = shared
        self._hashes: dict[tuple[Path, int, int], str] = {}

    def names(self) -> list[str]:
        registered = set(self.shared.names()) if self.shared else set()
        if not self.folder.is_dir():
            return sorted(registered)
        files = [p.stem for p in self.folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file()]
        folders = [p.name for p in self.folder.iterdir() if (p / DIFFUSERS_VAE_WEIGHTS).is_file()]
        return sorted(set(files) | set(folders) | registered)

    def get(self, name: str) -> VaeInfo:
        """The VAE ``name``; VaeError says why there is none to use."""
        stem = name[: -len(SAFETENSORS_SUFFIX)] if name.lower().endswith(SAFETENSORS_SUFFIX) else name
        try:
            check_lora_name(stem)  # the same rule as any name that must stay inside its folder
        except ValueError as exc:
            raise VaeError(
                f"{name!r} is not a VAE name: {exc}", allowed=f"a file or folder name in {self.folder}"
            ) from None
        file, folder = self.folder / f"{stem}{SAFETENSORS_SUFFIX}", self.folder / stem
        if file.is_file():
            weights, single = file, True
        elif (folder / DIFFUSERS_VAE_WEIGHTS).is_file() and (folder / "config.json").is_file():
            weights, single = folder / DIFFUSERS_VAE_WEIGHTS, False
        elif self.shared is not None and (registered := self.shared.lookup(stem)) is not None:
            return VaeInfo(stem, None, True, registered.sha256, registered.object_key)
        else:
            pickled = [self.folder / f"{stem}{s}" for s in PICKLED_SUFFIXES]
            if any(p.is_file() for p in pickled):
                raise VaeError(
                    f"VAE {name!r} is a pickled file: loading it can run arbitrary code",
                    allowed="a .safetensors VAE",
                )
            known = ", ".join(self.names()) or "none yet"
            raise VaeError(f"unknown VAE {name!r}", allowed=f"a VAE in {self.folder}: {known}")
        try:
            check_vae_file(weights)
        except FileRefused as exc:
            raise VaeError(f"VAE {name!r} is refused: {exc.message}") from None
        return VaeInfo(stem, file if single else folder, single, self._sha256(weights))

    def _sha256(self, path: Path) -> str:
        """The file's sha256, hashed once per (size, mtime)."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]
