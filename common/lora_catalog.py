"""LoRA files as the producer sees them: found by name, checked, described — without torch.

The seed's convention: a .safetensors file copied into ``<home>/autoimport/lora`` is usable
by its file name (with or without the extension), no restart needed. Everything here reads
only the file's safetensors header (a length and a JSON table), so the producer can refuse
a bad or mismatched LoRA at submit without loading a tensor:

- pickled formats (.ckpt, .pt, .bin, .pth) are refused: loading them runs arbitrary code;
- a header that is not valid safetensors (size, JSON, dtypes, offsets) is refused;
- the base family (sd15, sd2 or sdxl) comes from the file's metadata, its key names or its
  tensor shapes, in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.common.errors import JobRejected
from lorafleet.common.jobs import check_lora_name

if TYPE_CHECKING:
    from lorafleet.common.lora_registry import SharedLoras

SAFETENSORS_SUFFIX = ".safetensors"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 64 * 1024 * 1024
"""Largest safetensors header accepted (the format's own readers cap it at 100 MB)."""
MAX_LORA_BYTES = 4 * 1024**3
"""Largest LoRA file accepted (full-weight diffs of SDXL run to a few GB)."""

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

CROSS_ATTENTION_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
"""Family by the width of the text embedding that cross-attention reads."""

_CROSS_ATTENTION_INPUT = re.compile(
    r"attn2[._](?:to_[kv]|processor[._]to_[kv]_lora)[._](?:lora_down[._]weight|lora_A[._]weight|down[._]weight"
    r"|lora[._]down[._]weight|hada_w1_b)$"
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header; ValueError says what is wrong."""
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise ValueError(f"file is {size / 1024**3:.1f} GiB, over the {MAX_LORA_BYTES // 1024**3} GiB limit")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file is too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
        raw = f.read(length)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError("header is not a JSON object")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map strings to strings")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} not one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} fall outside the file")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}")
        tensors[name] = TensorInfo(dtype, tuple(shape))
    return SafetensorsHeader(tensors, metadata)


def detect_format(header: SafetensorsHeader) -> str:
    """The LoRA format, by its key names (and, for LoCon, its 3x3 factors)."""
    joined = "\n".join(header.tensors)
    if ".hada_w1_a" in joined:
        kind = "lycoris-loha"
    elif ".lokr_w1" in joined:
        kind = "lycoris-lokr"
    elif ".lora_A." in joined or ".lora_B." in joined:
        kind = "peft"
    elif ".lora_down." in joined:
        conv = any(
            k.endswith(".lora_down.weight") and len(t.shape) == 4 and t.shape[2:] != (1, 1)
            for k, t in header.tensors.items()
        )
        kind = "kohya-locon" if conv or ".lora_mid." in joined else "kohya-lora"
    elif ".lora.down." in joined or "_lora.down." in joined:
        kind = "diffusers-old"
    elif ".diff" in joined:
        kind = "full-diff"
    else:
        kind = "unknown"
    if ".dora_scale" in joined or ".lora_magnitude_vector" in joined:
        kind += "+dora"
    return kind


def detect_family(header: SafetensorsHeader) -> str | None:
    """sd15, sd2 or sdxl from metadata, key names, then shapes; None if nothing tells."""
    meta = header.metadata
    version = (meta.get("ss_base_model_version") or "").lower()
    arch = (meta.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd15"
    keys = list(header.tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")) for k in keys):
        return "sdxl"
    width = cross_attention_width(header)
    if width in CROSS_ATTENTION_FAMILY:
        return CROSS_ATTENTION_FAMILY[width]
    if any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in keys):
        return "sdxl"  # kohya's SDXL trainer writes the original block names; its SD1.5 one does not
    return None


def cross_attention_width(header: SafetensorsHeader) -> int | None:
    """Width of the text embedding the file's cross-attention factors read, if any."""
    for key, info in header.tensors.items():
        if _CROSS_ATTENTION_INPUT.search(key) and len(info.shape) == 2:
            return info.shape[1]
    return None


def _rank(header: SafetensorsHeader) -> int | None:
    ranks = [
        info.shape[0]
        for key, info in header.tensors.items()
        if re.search(r"(lora_down|lora_A|lora[._]down)\.weight$", key) and info.shape
    ]
    return max(ranks) if ranks else None


def _trigger_words(meta: dict[str, str]) -> list[str]:
    for key in ("lorafleet.trigger_words", "modelspec.trigger_phrase", "trigger_words", "ss_trigger_words"):
        value = meta.get(key, "").strip()
        if value:
            if value.startswith("["):
                try:
                    return [str(w).strip() for w in json.loads(value) if str(w).strip()]
                except ValueError:
                    pass
            return [w.strip() for w in value.split(",") if w.strip()]
    return []


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraInfo:
    """What the header says about one LoRA file."""

    name: str
    path: Path
    size: int
    sha256: str
    format: str
    family: str | None
    rank: int | None
    tensor_count: int
    trigger_words: list[str] = field(default_factory=list)
    cross_attention_width: int | None = None
    is_lcm: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        """First 12 hex digits of the sha256, as A1111's "Lora hashes" writes them."""
        return self.sha256[:12]


def describe_file(path: Path, name: str | None = None) -> LoraInfo:
    """Check and describe a LoRA file; ValueError says why it is refused."""
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise ValueError(
            f"{path.name} is a pickled {suffix} file: loading it can run arbitrary code, so only "
            ".safetensors LoRAs are accepted (convert it with a trusted tool first)"
        )
    if suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"{path.name}: only .safetensors LoRA files are accepted")
    header = read_safetensors_header(path)
    if not header.tensors:
        raise ValueError(f"{path.name} holds no tensors")
    name = name or path.stem
    lcm_meta = header.metadata.get("lorafleet.lcm", "").lower() == "true"
    return LoraInfo(
        name=name,
        path=path,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        format=detect_format(header),
        family=detect_family(header),
        rank=_rank(header),
        tensor_count=len(header.tensors),
        trigger_words=_trigger_words(header.metadata),
        cross_attention_width=cross_attention_width(header),
        is_lcm=lcm_meta or "lcm" in name.lower(),
        metadata=dict(header.metadata),
    )


class LoraCatalog:
    """The LoRA drop folder: names to files, each described once per (size, mtime)."""

    def __init__(self, folder: Path, shared: SharedLoras | None = None) -> None:
        self.folder = Path(folder)
        self.shared = shared
        self._cache: dict[Path, tuple[tuple[int, int], LoraInfo]] = {}
        self._lock = threading.Lock()

    def local_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())

    def names(self) -> list[str]:
        """Names in the folder and, with a shared registry, every registered name."""
        shared = self.shared.names() if self.shared else []
        return sorted(set(self.local_names()) | set(shared))

    def describe(self, name: str) -> LoraInfo | None:
        """The LoRA ``name``: the local file's description, else the registry's; None if refused."""
        path = self.path_of(name)
        if path is not None:
            try:
                return self.info(path)
            except (OSError, ValueError):
                return None
        return self.shared.lookup(name) if self.shared else None

    def on_disk(self, name: str, *, in_use: frozenset[str] | set[str] = frozenset()) -> LoraInfo | None:
        """The LoRA ``name`` as a file on this machine: the folder's, else the shared
        registry's, fetched into the disk cache (``in_use``: hashes eviction must spare) and
        described under its registered name. None if neither has it; ValueError if refused."""
        path = self.path_of(name)
        if path is not None:
            return self.info(path)
        registered = self.shared.lookup(name) if self.shared else None
        if registered is None:
            return None
        path = self.shared.fetch(registered, in_use=in_use)
        return replace(self.info(path), name=registered.name, is_lcm=registered.is_lcm)

    def path_of(self, name: str) -> Path | None:
        """The file a name refers to (``name`` or ``name.safetensors``), or None."""
        try:
            check_lora_name(name)
        except ValueError:
            return None
        stem = name[: -len(SAFETENSORS_SUFFIX)] if name.lower().endswith(SAFETENSORS_SUFFIX) else name
        path = self.folder / f"{stem}{SAFETENSORS_SUFFIX}"
        return path if path.is_file() else None

    def info(self, path: Path, name: str | None = None) -> LoraInfo:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        info = describe_file(path, name)
        with self._lock:
            self._cache[path] = (stamp, info)
        return info

    def resolve(self, name: str, *, field: str = "lora.name") -> LoraInfo:
        """The LoRA called ``name``, checked; JobRejected names the field and the choices."""
        path = self.path_of(name)
        if path is None and self.shared is not None:
            registered = self.shared.lookup(name)
            if registered is not None:
                return registered
        if path is None:
            stem = Path(name).stem
            pickled = [self.folder / f"{stem}{s}" for s in PICKLED_SUFFIXES]
            found = next((p for p in pickled if p.is_file()), None)
            if found is not None:
                raise JobRejected(
                    f"{found.name} is a pickled {found.suffix} file and is refused: loading it can "
                    "run arbitrary code",
                    field=field,
                    allowed="a .safetensors LoRA",
                )
            known = self.names()
            listing = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
            raise JobRejected(
                f"unknown LoRA {name!r}",
                field=field,
                allowed=f"a .safetensors file in {self.folder}"
                + (" or a LoRA imported with `lorafleet loras import`" if self.shared else "")
                + f": {listing or 'none yet'}",
            )
        try:
            return self.info(path)
        except (OSError, ValueError) as exc:
            raise JobRejected(f"LoRA {name!r} is refused: {exc}", field=field) from None
