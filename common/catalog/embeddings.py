"""Textual-inversion embeddings: new words for the text encoder, used in prompts by file name.

As in A1111 and InvokeAI, a .safetensors embedding dropped into ``<home>/autoimport/embedding/``
is used by writing its file name in a prompt. Read without torch:

- SD 1.x / 2.x files hold one tensor (``emb_params``, or the only one) of n vectors, each as
  wide as the text encoder (768 or 1024); SDXL files hold a ``clip_l`` and a ``clip_g`` set
  (768 and 1280), one per text encoder;
- a file with NaN or infinite values, a pickle, or anything else is refused naming it;
- whether it fits a model is a width check (``fits``), done at submit.
"""

from __future__ import annotations

import array
import math
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.drop_folder import DropFolder
from lorafleet.common.catalog.lora_files import (
    SafetensorsHeader,
    read_safetensors_header,
    refuse_pickled,
    sha256_file,
)
from lorafleet.common.catalog.shared_files import SharedFile, SharedFiles
from lorafleet.common.schema.errors import EmbeddingError, FileRefused
from lorafleet.common.schema.family import Family

MAX_EMBEDDING_BYTES = 16 * 1024**2
"""Largest embedding file accepted (a 75-vector SDXL embedding is under 1 MB)."""
SDXL_KEYS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class EmbeddingInfo:
    """One embedding: its vectors per text encoder (``text_encoder``, ``text_encoder_2``)."""

    name: str
    path: Path | None
    sha256: str
    vectors: int
    widths: dict[str, int]
    object_key: str | None = None
    """For an embedding known only from the shared registry: its object in the store."""

    def fits(self, family: Family | None, text_widths: dict[str, int]) -> str | None:
        """None if it fits a model whose text encoders are ``text_widths`` wide, else why not."""
        if set(self.widths) != set(text_widths):
            kind = "SDXL (clip_l and clip_g)" if len(self.widths) == 2 else "single-encoder (SD 1.x/2.x)"
            return f"embedding {self.name!r} is {kind}; the model is {family or 'of another family'}"
        for encoder, width in self.widths.items():
            if width != text_widths[encoder]:
                return f"embedding {self.name!r} has {width}-wide vectors; the model's {encoder} is {text_widths[encoder]} wide"
        return None


def _floats(raw: bytes, dtype: str) -> list[float]:
    if dtype == "F32":
        values = array.array("f")
        values.frombytes(raw)
        return list(values)
    if dtype == "F16":
        return [v for (v,) in struct.iter_unpack("<e", raw)]
    if dtype == "BF16":
        return [struct.unpack("<f", b"\x00\x00" + raw[i : i + 2])[0] for i in range(0, len(raw), 2)]
    if dtype == "F64":
        return [v for (v,) in struct.iter_unpack("<d", raw)]
    raise FileRefused(f"its vectors are {dtype}, not floating point", allowed="F32, F16 or BF16")


def _check_values(path: Path, header: SafetensorsHeader, names: list[str]) -> None:
    """FileRefused if any of the tensors ``names`` holds NaN or an infinity."""
    data = path.read_bytes()[header.data_start :]  # small: the size was capped
    for name in names:
        start, end = header.tensors[name].offsets
        values = _floats(data[start:end], header.tensors[name].dtype)
        if any(math.isnan(v) or math.isinf(v) for v in values):
            raise FileRefused(f"tensor {name!r} holds NaN or infinite values", field=path.name)


def describe_embedding(path: Path, name: str | None = None) -> EmbeddingInfo:
    """Check and describe an embedding file; FileRefused says why it is refused."""
    refuse_pickled(path)
    header = read_safetensors_header(path, max_bytes=MAX_EMBEDDING_BYTES)
    tensors = header.tensors
    if all(key in tensors for key in SDXL_KEYS):
        keys, encoders = list(SDXL_KEYS), ["text_encoder", "text_encoder_2"]
    elif "emb_params" in tensors or len(tensors) == 1:
        keys, encoders = ["emb_params" if "emb_params" in tensors else next(iter(tensors))], ["text_encoder"]
    else:
        raise FileRefused(
            "not a textual-inversion embedding: no emb_params, no clip_l/clip_g pair, and more than one tensor",
            field=path.name,
        )
    shapes = [tensors[k].shape for k in keys]
    if any(len(s) not in (1, 2) or s[-1] == 0 for s in shapes):
        raise FileRefused(f"its vectors have shapes {shapes}, not [vectors, width]", field=path.name)
    counts = {s[0] if len(s) == 2 else 1 for s in shapes}
    if len(counts) != 1:
        raise FileRefused("its clip_l and clip_g sets hold different numbers of vectors", field=path.name)
    if any(tensors[k].dtype not in ("F32", "F16", "BF16", "F64") for k in keys):
        raise FileRefused("its vectors are not floating point", field=path.name)
    _check_values(path, header, keys)
    return EmbeddingInfo(
        name=name or path.stem,
        path=path,
        sha256=sha256_file(path),
        vectors=counts.pop(),
        widths={encoder: shape[-1] for encoder, shape in zip(encoders, shapes)},
    )


class EmbeddingCatalog(DropFolder[EmbeddingInfo]):
    """The embedding drop folder (each file described once per size and mtime) and, when
    given, the fleet's registered embeddings."""

    noun = "embedding"
    a_noun = "an embedding"
    error = EmbeddingError
    import_command = "lorafleet embeddings import"
    suffix_in_names = False  # a name is a word written in a prompt, never a file name

    def __init__(self, folder: Path, shared: SharedFiles | None = None) -> None:
        super().__init__(folder, shared)
        self._batch = threading.local()

    @contextmanager
    def names_read_once(self) -> Iterator[None]:
        """Within the block, ``mentioned`` reads the folder and the registry once (this thread):
        a batch of jobs costs one listing, not one per job."""
        self._batch.names = self.names()
        try:
            yield
        finally:
            self._batch.names = None

    def mentioned(self, *texts: str) -> list[str]:
        """Names of the embeddings written as words in ``texts``, in name order."""
        names = getattr(self._batch, "names", None)
        names = self.names() if names is None else names
        if not names:
            return []
        words = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
        return sorted({match for text in texts for match in words.findall(text)})

    def _describe(self, path: Path, name: str | None) -> EmbeddingInfo:
        return describe_embedding(path, name)

    def _from_shared(self, entry: SharedFile) -> EmbeddingInfo:
        vectors, widths = int(entry.meta.get("vectors", 1)), dict(entry.meta.get("widths", {}))
        return EmbeddingInfo(entry.name, None, entry.sha256, vectors, widths, entry.object_key)
