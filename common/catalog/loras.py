"""A LoRA by name, for a job: the drop folder first, then the shared registry.

InvokeAI's LoRA guidance: a .safetensors file copied into ``<home>/autoimport/lora`` is
usable by its file name (with or without the extension), no restart needed. A name the
folder does not hold may be registered for the whole fleet (`lorafleet loras import`).

One lookup, ``get``: it returns the LoRA's description or raises LoraError saying what is
wrong (unknown, pickled, refused file) and what is allowed. A file in the folder is
described once per (size, mtime).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.lora_files import PICKLED_SUFFIXES, SAFETENSORS_SUFFIX, LoraInfo, describe_file
from lorafleet.common.catalog.shared_files import LoraRegistry
from lorafleet.common.schema.errors import FileRefused, LoraError
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.jobs import check_lora_name

NAMES_LISTED = 12
"""How many known names an "unknown LoRA" refusal lists."""


@dataclass(frozen=True)
class BrokenLora:
    """A file in the drop folder that cannot be used, and why."""

    name: str
    path: Path
    problem: str


class LoraCatalog:
    """The LoRA drop folder and, when given, the fleet's shared registry."""

    def __init__(self, folder: Path, registry: LoraRegistry | None = None) -> None:
        self.folder = Path(folder)
        self.registry = registry
        self._described: dict[Path, tuple[tuple[int, int], LoraInfo]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ names
    def local_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{SAFETENSORS_SUFFIX}") if p.is_file())

    def registered_names(self) -> list[str]:
        return self.registry.names() if self.registry else []

    def names(self) -> list[str]:
        """Names in the folder and every registered name."""
        return sorted(set(self.local_names()) | set(self.registered_names()))

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> LoraInfo:
        """The LoRA called ``name``; LoraError says why there is none to use.

        The folder's file wins for its name; otherwise the registry's entry (no local
        path: ``object_key`` names its object in the store).
        """
        path = self.path_of(name)
        if path is not None:
            try:
                return self.describe(path)
            except FileRefused as exc:
                raise LoraError(f"LoRA {name!r} is refused: {exc.message}") from None
            except OSError as exc:
                raise LoraError(f"LoRA {name!r} cannot be read: {exc.strerror or exc}") from None
        registered = self.registry.lookup_lora(name) if self.registry and _plain(name) else None
        if registered is not None:
            return registered
        raise self._unknown(name)

    def path_of(self, name: str) -> Path | None:
        """The folder's file a name refers to (``name`` or ``name.safetensors``), or None."""
        if not _plain(name):
            return None
        stem = name[: -len(SAFETENSORS_SUFFIX)] if name.lower().endswith(SAFETENSORS_SUFFIX) else name
        path = self.folder / f"{stem}{SAFETENSORS_SUFFIX}"
        return path if path.is_file() else None

    def describe(self, path: Path, name: str | None = None) -> LoraInfo:
        """The description of a file (cached by size and mtime); FileRefused if refused."""
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._described.get(path)
        if cached and cached[0] == stamp and (name is None or cached[1].name == name):
            return cached[1]
        info = describe_file(path, name)
        with self._lock:
            self._described[path] = (stamp, info)
        return info

    def _unknown(self, name: str) -> LoraError:
        stem = Path(name).stem if _plain(name) else name
        pickled = (
            next(
                (
                    self.folder / f"{stem}{s}"
                    for s in PICKLED_SUFFIXES
                    if (self.folder / f"{stem}{s}").is_file()
                ),
                None,
            )
            if _plain(name)
            else None
        )
        if pickled is not None:
            return LoraError(
                f"{pickled.name} is a pickled {pickled.suffix} file and is refused: loading it can run arbitrary code",
                allowed="a .safetensors LoRA",
            )
        known = self.names()
        listing = ", ".join(known[:NAMES_LISTED]) + (" ..." if len(known) > NAMES_LISTED else "")
        where = f"a .safetensors file in {self.folder}"
        if self.registry:
            where += " or a LoRA imported with `lorafleet loras import`"
        return LoraError(f"unknown LoRA {name!r}", allowed=f"{where}: {listing or 'none yet'}")

    # ------------------------------------------------------------------ the whole folder
    def scan(self) -> tuple[list[LoraInfo], list[BrokenLora]]:
        """Every LoRA usable by name (folder and registry) and every broken file in the folder."""
        usable, broken = [], []
        for name in self.names():
            try:
                usable.append(self.get(name))
            except LoraError as exc:
                path = self.path_of(name)
                if path is not None:
                    broken.append(BrokenLora(name, path, exc.message))
        return usable, broken

    def lcm_loras(self, family: Family | None) -> tuple[list[LoraInfo], list[BrokenLora]]:
        """LCM-LoRAs that fit ``family`` (or say no family), and the broken files met on the way."""
        usable, broken = self.scan()
        fitting = [
            i for i in usable if i.is_lcm and (i.family is None or family is None or i.family == family)
        ]
        return fitting, broken


def _plain(name: str) -> bool:
    try:
        check_lora_name(name)
    except ValueError:
        return False
    return True
