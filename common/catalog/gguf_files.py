"""GGUF files (llama.cpp's format; city96's quantized FLUX.1, Qwen-Image, Z-Image and
FLUX.2 Klein transformers) as a checkpoint's header: tensor names, the shapes of the values
they stand for, and their GGML types. Read with the ``gguf`` package (llama.cpp's own
reader, numpy only: no torch), which maps the file rather than reading it.

GGML lists a tensor's dimensions innermost first; torch's order is the reverse, so a
(3072, 3072) Linear weight is ``[3072, 3072]`` either way but a (96, 32) one is stored
``[32, 96]``: the header here gives torch's order, as a safetensors header does.
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.common.catalog.lora_files import SafetensorsHeader, TensorInfo
from lorafleet.common.schema.errors import FileRefused

GGUF_SUFFIX = ".gguf"
GGUF_ALLOWED = "a GGUF file of a FLUX.1, FLUX.2 Klein, Qwen-Image or Z-Image transformer (Q8_0, Q4_K ...)"


QUANTIZED_TYPES = {
    "Q8_0",
    "Q5_1",
    "Q5_0",
    "Q4_1",
    "Q4_0",
    "Q6_K",
    "Q5_K",
    "Q4_K",
    "Q3_K",
    "Q2_K",
    "IQ4_NL",
    "IQ4_XS",
}
"""GGML block types the workers dequantize (diffusers' GGUF support)."""
PLAIN_TYPES = {"F32", "F16", "BF16"}


def check_gguf_types(header: SafetensorsHeader, name: str) -> None:
    """FileRefused for a type the workers cannot dequantize, or a file with no quantized tensor."""
    types = {t.dtype for t in header.tensors.values()}
    unknown = sorted(types - QUANTIZED_TYPES - PLAIN_TYPES)
    if unknown:
        raise FileRefused(
            f"its tensors are of GGML type {', '.join(unknown)}, which lorafleet's workers cannot dequantize",
            field=name,
            allowed=f"GGUF files of {', '.join(sorted(QUANTIZED_TYPES))}",
        )
    if not types & QUANTIZED_TYPES:
        raise FileRefused(
            "a GGUF file without a quantized tensor: serve its weights as .safetensors",
            field=name,
            allowed=GGUF_ALLOWED,
        )


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX


def read_gguf_header(path: Path, *, max_bytes: int) -> SafetensorsHeader:
    """The file's tensors (torch-order shapes, GGML type names as dtypes) and its string
    metadata; FileRefused names what is wrong with the file."""
    from gguf import GGUFReader

    size = path.stat().st_size
    if size > max_bytes:
        raise FileRefused(
            f"it is {size / 1024**3:.1f} GiB, over the {max_bytes / 1024**3:g} GiB limit", field=path.name
        )
    try:
        reader = GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, OSError) as exc:  # a truncated or foreign file
        raise FileRefused(
            f"not a readable GGUF file ({exc})", field=path.name, allowed=GGUF_ALLOWED
        ) from None
    tensors = {
        t.name: TensorInfo(t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("general.") and field.types and field.types[0].name == "STRING":
            metadata[name] = field.contents()
    return SafetensorsHeader(tensors=tensors, metadata=metadata)
