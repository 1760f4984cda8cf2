"""A LoRA by name, for a job: the drop folder first, then the shared registry.

InvokeAI's LoRA guidance: a .safetensors file copied into ``<home>/autoimport/lora`` is
usable by its file name (with or without the extension), no restart needed. A name the
folder does not hold may be registered for the whole fleet (`lorafleet loras import`).

One lookup, ``get`` (``DropFolder``'s order): it returns the LoRA's description or raises
LoraError saying what is wrong (unknown, pickled, refused file) and what is allowed. A file
in the folder is described once per (size, mtime). What is a LoRA's own: the registry's
entries in 0.1's layout, and the scan for broken files and LCM-LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.common.catalog.drop_folder import DropFolder
from lorafleet.common.catalog.lora_files import LoraInfo, describe_file
from lorafleet.common.catalog.shared_files import LoraRegistry
from lorafleet.common.schema.errors import LoraError
from lorafleet.common.schema.family import Family


@dataclass(frozen=True)
class BrokenLora:
    """A file in the drop folder that cannot be used, and why."""

    name: str
    path: Path
    problem: str


class LoraCatalog(DropFolder[LoraInfo]):
    """The LoRA drop folder and, when given, the fleet's shared registry."""

    noun = "LoRA"
    a_noun = "a LoRA"
    error = LoraError
    import_command = "lorafleet loras import"

    def __init__(self, folder: Path, registry: LoraRegistry | None = None) -> None:
        super().__init__(folder, registry)
        self.registry = registry

    def _describe(self, path: Path, name: str | None) -> LoraInfo:
        return describe_file(path, name)

    def _registered(self, stem: str) -> LoraInfo | None:
        # LoRA entries keep the layout lorafleet 0.1 wrote: the registry reads them whole.
        return self.registry.lookup_lora(stem) if self.registry is not None else None

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
