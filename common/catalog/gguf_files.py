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
