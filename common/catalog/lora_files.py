"""One LoRA file, read without torch: its safetensors header checked, the file described.

InvokeAI's LoRA guidance keeps LoRAs as .safetensors files. Everything here reads only the
file's header (a length and a JSON table), so the producer can refuse a bad or mismatched
LoRA at submit without loading a tensor:

- pickled formats (.ckpt, .pt, .bin, .pth) are refused: loading them runs arbitrary code;
- a header that is not valid safetensors (size, JSON, dtypes, offsets) is refused;
- the base family comes from the file's metadata, its key names or its tensor shapes, in
  that order; for the flow-matching families (FLUX.1, FLUX.2, Qwen-Image, Z-Image) the
  names and shapes must agree with the metadata (catalog/family_keys.py).

Every refusal is a FileRefused naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.common.catalog.family_keys import LoraBase, flow_base
from lorafleet.common.schema.errors import FileRefused
from lorafleet.common.schema.family import FAMILY_BY_CROSS_ATTENTION, Family

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
"""Bytes per element of each safetensors dtype."""

_CROSS_ATTENTION_INPUT = re.compile(
    r"attn2[._](?:to_[kv]|processor[._]to_[kv]_lora)[._](?:lora_down[._]weight|lora_A[._]weight|down[._]weight"
    r"|lora[._]down[._]weight|hada_w1_b)$"
)
_DOWN_FACTOR = re.compile(r"(lora_down|lora_A(\.[^.]+)?|lora[._]down|_lora\d\.down)\.weight$")
_BFL_BLOCK = re.compile(r"^(?:model\.)?(?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.")
"""Black Forest Labs' own FLUX block names, as ComfyUI and ai-toolkit write LoRAs on them."""
_TRIGGER_KEYS = ("lorafleet.trigger_words", "modelspec.trigger_phrase", "trigger_words", "ss_trigger_words")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)
    """Where its bytes are, from the start of the data (after the header)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0
    """Where the data begins in the file: 8 bytes of length plus the header."""


def read_safetensors_header(path: Path, *, max_bytes: int = MAX_LORA_BYTES) -> SafetensorsHeader:
    """Parse and check a safetensors header; FileRefused says what is wrong with the file."""
    size = path.stat().st_size
    if size > max_bytes:
        raise _refused(path, f"it is {size / 1024**3:.1f} GiB, over the {max_bytes / 1024**3:g} GiB limit")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _refused(path, "it is too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _refused(path, f"header length {length} does not fit the file ({size} bytes)")
        raw = f.read(length)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _refused(path, f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise _refused(path, "header nests too deeply to be a safetensors table") from None
    if not isinstance(table, dict):
        raise _refused(path, "header is not a JSON object")
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refused(path, "__metadata__ must map strings to strings")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise _refused(path, f"tensor {name!r}: entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise _refused(path, f"tensor {name!r}: dtype {dtype!r} not one of {', '.join(DTYPE_BYTES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _refused(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise _refused(path, f"tensor {name!r}: data_offsets {offsets!r} fall outside the file")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _refused(
                path, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
    return SafetensorsHeader(tensors, metadata, 8 + length)


def _refused(path: Path, problem: str) -> FileRefused:
    return FileRefused(problem, field=path.name)


def refuse_pickled(path: Path) -> None:
    """FileRefused for a pickled file or any file that is not .safetensors."""
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise FileRefused(
            f"a pickled {suffix} file: loading it can run arbitrary code, so only .safetensors files are "
            "accepted (convert it with a trusted tool first)",
            field=path.name,
        )
    if suffix != SAFETENSORS_SUFFIX:
        raise FileRefused("only .safetensors files are accepted", field=path.name)


def detect_format(header: SafetensorsHeader) -> str:
    """The LoRA format, by its key names (and, for LoCon, its 3x3 factors).

    Kinds: ``kohya-lora`` / ``kohya-locon`` (``lora_down``/``lora_up``), ``peft``
    (``lora_A``/``lora_B`` on diffusers names), ``bfl-lora`` (``lora_A``/``lora_B`` on BFL's
    FLUX block names), ``comfy-lora`` (``lora_A``/``lora_B`` under ``diffusion_model.`` on
    other original names), ``onetrainer`` (``lora_transformer_``), ``xlabs``,
    ``lycoris-loha``, ``lycoris-lokr``, ``diffusers-old``, ``full-diff``, ``unknown``; a
    ``+dora`` suffix when the file carries DoRA magnitudes.
    """
    keys = list(header.tensors)
    joined = "\n".join(keys)
    if ".hada_w1_a" in joined:
        kind = "lycoris-loha"
    elif ".lokr_w1" in joined:
        kind = "lycoris-lokr"
    elif any(_BFL_BLOCK.match(k) and ".processor." in k for k in keys):
        kind = "xlabs"
    elif ".lora_A." in joined or ".lora_B." in joined:
        if any(_BFL_BLOCK.match(k) for k in keys):
            kind = "bfl-lora"
        elif any(k.startswith("diffusion_model.") for k in keys):
            kind = "comfy-lora"
        else:
            kind = "peft"
    elif ".lora_down." in joined and any(k.startswith("lora_transformer_") for k in keys):
        kind = "onetrainer"
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


def detect_family(header: SafetensorsHeader) -> Family | None:
    """The family from metadata, key names, then shapes; None if nothing tells."""
    return _base(header).family


def detect_variant(header: SafetensorsHeader) -> str | None:
    """The variant of the family the file was made for, where one tells: ``klein-4b``,
    ``klein-9b`` or ``dev`` for FLUX.2 (LoRAs do not cross them), ``edit`` for Qwen-Image Edit."""
    return _base(header).variant


def transformer_width(header: SafetensorsHeader) -> int | None:
    """The hidden size of the flow transformer the file's factors were made for (3072 for
    FLUX.1, Qwen-Image and FLUX.2 Klein 4B, 4096 for Klein 9B, 3840 for Z-Image); None for
    SD files or when the shapes do not give one width."""
    return _base(header).width


def _base(header: SafetensorsHeader) -> LoraBase:
    meta = header.metadata
    version = (meta.get("ss_base_model_version") or "").lower()
    arch = (meta.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return LoraBase(Family.sdxl)
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return LoraBase(Family.sd2)
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return LoraBase(Family.sd15)
    flow = flow_base(meta, {k: t.shape for k, t in header.tensors.items()})
    if flow is not None:  # checked before lora_te1_: kohya's FLUX.1 LoRAs carry CLIP keys too
        return flow
    return LoraBase(_sd_family(header))


def _sd_family(header: SafetensorsHeader) -> Family | None:
    keys = list(header.tensors)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")) for k in keys):
        return Family.sdxl
    width = cross_attention_width(header)
    if width in FAMILY_BY_CROSS_ATTENTION:
        return FAMILY_BY_CROSS_ATTENTION[width]
    if any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in keys):
        return Family.sdxl  # kohya's SDXL trainer writes the original block names; its SD1.5 one does not
    return None


def cross_attention_width(header: SafetensorsHeader) -> int | None:
    """Width of the text embedding the file's cross-attention factors read, if any."""
    for key, info in header.tensors.items():
        if _CROSS_ATTENTION_INPUT.search(key) and len(info.shape) == 2:
            return info.shape[1]
    return None


def _rank(header: SafetensorsHeader) -> int | None:
    ranks = [info.shape[0] for key, info in header.tensors.items() if _DOWN_FACTOR.search(key) and info.shape]
    return max(ranks) if ranks else None


def _trigger_words(meta: dict[str, str]) -> list[str]:
    for key in _TRIGGER_KEYS:
        value = meta.get(key, "").strip()
        if value:
            if value.startswith("["):
                try:
                    return [str(w).strip() for w in json.loads(value) if str(w).strip()]
                except (ValueError, TypeError, RecursionError):
                    pass
            return [w.strip() for w in value.split(",") if w.strip()]
    return []


def sha256_file(path: Path, *, skip_header: bool = False) -> str:
    """The file's sha256; with ``skip_header``, of a safetensors file's tensor data only
    (A1111's "Lora hashes" and Civitai's AutoV3: the same weights under other metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            (length,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + length)
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraInfo:
    """What the header says about one LoRA file.

    ``path`` is the file on this machine; a LoRA known only from the shared registry has
    none, and ``object_key`` names its object in the store instead.
    """

    name: str
    path: Path | None
    size: int
    sha256: str
    format: str
    family: Family | None
    rank: int | None
    tensor_count: int
    trigger_words: list[str] = field(default_factory=list)
    cross_attention_width: int | None = None
    variant: str | None = None
    """The family's variant where the file tells (FLUX.2: ``klein-4b``, ``klein-9b``, ``dev``;
    Qwen-Image Edit: ``edit``)."""
    transformer_width: int | None = None
    """Hidden size of the flow transformer the factors fit (None for SD files)."""
    is_lcm: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    object_key: str | None = None

    @property
    def short_hash(self) -> str:
        """First 12 hex digits of the sha256, as A1111's "Lora hashes" writes them."""
        return self.sha256[:12]


def describe_file(path: Path, name: str | None = None) -> LoraInfo:
    """Check and describe a LoRA file; FileRefused says why it is refused."""
    refuse_pickled(path)
    header = read_safetensors_header(path)
    if not header.tensors:
        raise FileRefused("it holds no tensors", field=path.name)
    empty = next((n for n, t in header.tensors.items() if 0 in t.shape), None)
    if empty is not None:
        raise FileRefused(
            f"tensor {empty!r} has shape {list(header.tensors[empty].shape)}: a factor of rank 0 "
            "(or an empty tensor) cannot be applied",
            field=path.name,
        )
    name = name or path.stem
    lcm_meta = header.metadata.get("lorafleet.lcm", "").lower() == "true"
    base = _base(header)
    return LoraInfo(
        name=name,
        path=path,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        format=detect_format(header),
        family=base.family,
        rank=_rank(header),
        tensor_count=len(header.tensors),
        trigger_words=_trigger_words(header.metadata),
        cross_attention_width=cross_attention_width(header),
        variant=base.variant,
        transformer_width=base.width,
        is_lcm=lcm_meta or "lcm" in name.lower(),
        metadata=dict(header.metadata),
    )
