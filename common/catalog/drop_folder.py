"""A drop folder of files users copy in or import, by name: what LoRAs, embeddings and VAEs share.

Each kind has a folder under ``<home>/autoimport/`` and, when a broker is reachable, the
fleet's registry of that kind (``SharedFiles``). A name resolves in one order, the same for
every kind:

1. the name is checked (``check_lora_name``): it can only mean something inside the folder;
2. a local file (or a kind's other local form, a VAE's diffusers folder) wins for its name,
   described once per (size, mtime) and described again when it is rewritten;
3. else the registered entry (no local path: its object in the store);
4. else a pickled file of that name is refused, saying why;
5. else "unknown", naming the folder and the names known.

A kind's catalog subclasses ``DropFolder`` and says only what is its own: its noun and error
class, how to describe a local file, how to read a registered entry, and any other local form.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Generic, Protocol, TypeVar

from lorafleet.common.catalog.lora_files import PICKLED_SUFFIXES, SAFETENSORS_SUFFIX
from lorafleet.common.catalog.shared_files import SharedFile, SharedFiles
from lorafleet.common.schema.errors import FileRefused, InvalidInput
from lorafleet.common.schema.jobs import check_lora_name

NAMES_LISTED = 12
"""How many known names an "unknown" refusal lists."""


class _Named(Protocol):
    @property
    def name(self) -> str: ...


InfoT = TypeVar("InfoT", bound=_Named)


class DropFolder(ABC, Generic[InfoT]):
    """Names to descriptions (``InfoT``) for one kind of file: the folder, then the registry."""

    noun: ClassVar[str]
    """What users call one, in messages: ``LoRA``, ``embedding``, ``VAE``."""
    a_noun: ClassVar[str]
    """The noun with its article: ``a LoRA``, ``an embedding``."""
    error: ClassVar[type[InvalidInput]]
    """What ``get`` raises: LoraError, EmbeddingError, VaeError."""
    local_kind: ClassVar[str] = f"a {SAFETENSORS_SUFFIX} file"
    """What the folder may hold, in messages."""
    import_command: ClassVar[str]
    """The command that registers one for the fleet, named when a name is unknown."""
    suffix_in_names: ClassVar[bool] = True
    """Whether a name may be written with its file's suffix (``watercolor.safetensors``)."""

    def __init__(self, folder: Path, shared: SharedFiles | None = None) -> None:
        self.folder = Path(folder)
        self.shared = shared
        self._described: dict[Path, tuple[tuple[int, int], InfoT]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ names
    def local_names(self) -> list[str]:
        """Names of the usable forms in the folder (its .safetensors files)."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())

    def registered_names(self) -> list[str]:
        return self.shared.names() if self.shared is not None else []

    def names(self) -> list[str]:
        """Names in the folder and every registered name."""
        return sorted(set(self.local_names()) | set(self.registered_names()))

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> InfoT:
        """The one called ``name``; ``error`` says why there is none to use.

        The folder's file wins for its name; otherwise the registry's entry (no local path:
        ``object_key`` names its object in the store).
        """
        try:
            stem = self._stem(name)
        except ValueError as exc:
            raise self.error(
                f"{name!r} is not {self.a_noun} name: {exc}",
                allowed=f"the name of {self.local_kind} in {self.folder}",
            ) from None
        path = self._local(stem)
        if path is not None:
            try:
                return self.describe(path, stem)
            except FileRefused as exc:
                raise self.error(f"{self.noun} {name!r} is refused: {exc.message}") from None
            except OSError as exc:
                raise self.error(f"{self.noun} {name!r} cannot be read: {exc.strerror or exc}") from None
        registered = self._registered(stem)
        if registered is not None:
            return registered
        raise self._pickled(stem) or self._unknown(name)

    def path_of(self, name: str) -> Path | None:
        """The file in the folder that holds ``name``'s bytes, or None (none, or not a plain name)."""
        try:
            return self._local(self._stem(name))
        except ValueError:
            return None

    def describe(self, path: Path, name: str | None = None) -> InfoT:
        """The description of a local file, cached by size and mtime; FileRefused if refused."""
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._described.get(path)
        if cached and cached[0] == stamp and (name is None or cached[1].name == name):
            return cached[1]
        info = self._describe(path, name)
        with self._lock:
            self._described[path] = (stamp, info)
        return info

    # ------------------------------------------------------------------ what a kind says
    @abstractmethod
    def _describe(self, path: Path, name: str | None) -> InfoT:
        """Check and describe a local file (named after it when ``name`` is None); FileRefused if refused."""

    def _from_shared(self, entry: SharedFile) -> InfoT:
        """The description of a registered entry."""
        raise NotImplementedError(f"{type(self).__name__} reads no registered entries")

    def _registered(self, stem: str) -> InfoT | None:
        """The registry's entry for ``stem``, described, or None."""
        entry = self.shared.lookup(stem) if self.shared is not None else None
        return None if entry is None else self._from_shared(entry)

    def _local(self, stem: str) -> Path | None:
        """The file in the folder that holds ``stem``'s bytes, or None."""
        path = self.folder / f"{stem}{SAFETENSORS_SUFFIX}"
        return path if path.is_file() else None

    # ------------------------------------------------------------------ the shared order's parts
    def _stem(self, name: str) -> str:
        """``name`` without its suffix (where names may have one); ValueError unless plain."""
        if self.suffix_in_names and name.lower().endswith(SAFETENSORS_SUFFIX):
            name = name[: -len(SAFETENSORS_SUFFIX)]
        check_lora_name(name)  # the one rule for any name that must stay inside its folder
        return name

    def _pickled(self, stem: str) -> InvalidInput | None:
        """The refusal of a pickled file called ``stem`` in the folder, or None if there is none."""
        found = next(
            (p for s in PICKLED_SUFFIXES if (p := self.folder / f"{stem}{s}").is_file()),
            None,
        )
        if found is None:
            return None
        return self.error(
            f"{found.name} is a pickled {found.suffix} file and is refused: loading it can run arbitrary code",
            allowed=f"a {SAFETENSORS_SUFFIX} {self.noun}",
        )

    def _unknown(self, name: str) -> InvalidInput:
        known = self.names()
        listing = ", ".join(known[:NAMES_LISTED]) + (" ..." if len(known) > NAMES_LISTED else "")
        where = f"{self.local_kind} in {self.folder}"
        if self.shared is not None:
            where += f" or {self.a_noun} imported with `{self.import_command}`"
        return self.error(f"unknown {self.noun} {name!r}", allowed=f"{where}: {listing or 'none yet'}")


class FilesOrFolders(DropFolder[InfoT]):
    """A drop folder whose kind also comes as diffusers folders (``config.json`` beside
    ``diffusion_pytorch_model.safetensors``): VAEs, ControlNets. A folder is named by itself."""

    weights_name: ClassVar[str] = "diffusion_pytorch_model.safetensors"

    def local_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        folders = {p.name for p in self.folder.iterdir() if self._folder_weights(p)}
        return sorted(set(super().local_names()) | folders)

    def _local(self, stem: str) -> Path | None:
        return super()._local(stem) or self._folder_weights(self.folder / stem)

    def _folder_weights(self, folder: Path) -> Path | None:
        """The weights of a diffusers folder (beside its ``config.json``), or None."""
        weights = folder / self.weights_name
        return weights if weights.is_file() and (folder / "config.json").is_file() else None
