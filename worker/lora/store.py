"""The worker's LoRAs: found as files, parsed once per model, kept on the device.

A job names each LoRA and carries the sha256 the producer resolved at submit. The worker
finds the file (``lora_files``: its own drop folder, else fetched from the store), checks
the hash (a file replaced since submit is an error, not a surprise), parses it against the
model's layers, and keeps the parsed factors on the device in an LRU within a byte budget,
keyed by (model, sha256), never evicting the LoRAs of the job being prepared.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from lorafleet.common.catalog.lora_files import LoraInfo
from lorafleet.common.schema.errors import JobFailed, LoraError
from lorafleet.common.schema.jobs import LoraSpec
from lorafleet.worker.lora.files import LoraFiles
from lorafleet.worker.lora.formats import ParsedLora, parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from lorafleet.worker.lru import LRUCache

logger = logging.getLogger(__name__)

UNMATCHED_SHOWN = 3
"""How many unmatched keys a warning names."""


@dataclass
class LoadedStack:
    """A job's LoRA stack, ready for the patcher."""

    entries: list[StackEntry] = field(default_factory=list)
    infos: list[LoraInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0


class LoraStore:
    """Parsed LoRAs per (model key, sha256), least recently used evicted past the budget."""

    def __init__(self, files: LoraFiles, device: torch.device, budget_bytes: int) -> None:
        self.files = files
        self.device = device
        self._parsed: LRUCache[tuple[str, str], ParsedLora] = LRUCache(
            max_bytes=budget_bytes, size=lambda p: p.nbytes
        )
        self._names: dict[str, str] = {}  # sha256 -> the name it was last loaded by
        self._stack_pins: list[tuple[str, str]] = []  # the last stack's keys
        self._lock = threading.RLock()  # a job's stack and the next jobs' prefetch take turns

    def cached(self) -> list[tuple[str, str]]:
        """(model key, sha256) of every parsed LoRA, least recently used first."""
        return self._parsed.keys()

    def cached_names(self) -> list[str]:
        """'name (sha256 prefix)' of every cached LoRA, most recently used last."""
        return [f"{self._names.get(sha, '?')} ({sha[:12]})" for _, sha in self._parsed.keys()]

    def stack(self, model_key: str, patcher: WeightPatcher, specs: list[LoraSpec]) -> LoadedStack:
        """Load (or take from the cache) every LoRA of a job, in stack order.

        The job's own LoRAs are pinned until the next job's stack is loaded: the budget
        never evicts what the running job uses.
        """
        with self._lock:
            return self._stack(model_key, patcher, specs)

    def prepare(self, model_key: str, patcher: WeightPatcher, specs: list[LoraSpec]) -> int:
        """Make a waiting job's LoRAs ready ahead of it (fetched, parsed, on the device,
        unpinned in the cache), while another job samples; returns how many were parsed."""
        with self._lock:
            parsed = 0
            needed = {spec.sha256 for spec in specs if spec.sha256}
            for spec in specs:
                if spec.sha256 and (model_key, spec.sha256) in self._parsed:
                    continue
                info = self._file(spec, needed)
                if (model_key, info.sha256) in self._parsed:
                    continue
                self._parsed.put((model_key, info.sha256), self._parse(info, patcher))
                self._names[info.sha256] = info.name
                parsed += 1
                logger.info("LoRA %s (%s) made ready for a waiting job", info.name, info.short_hash)
            self._parsed.make_room()
            return parsed

    def _stack(self, model_key: str, patcher: WeightPatcher, specs: list[LoraSpec]) -> LoadedStack:
        loaded = LoadedStack()
        start = time.perf_counter()
        for key in self._stack_pins:
            self._parsed.unpin(key)
        self._stack_pins = []
        needed = {spec.sha256 for spec in specs if spec.sha256}
        for spec in specs:
            info = self._file(spec, needed)
            key = (model_key, info.sha256)
            self._parsed.pin(key)
            self._stack_pins.append(key)
            self._names[info.sha256] = info.name
            parsed = self._parsed.get(key)
            if parsed is not None:
                loaded.hits += 1
                logger.info("LoRA cache hit: %s (%s)", info.name, info.short_hash)
            else:
                parsed = self._parse(info, patcher)
                self._parsed.put(key, parsed)
                loaded.misses += 1
                logger.info(
                    "LoRA cache miss: %s (%s) parsed, %d layers",
                    info.name,
                    info.short_hash,
                    len(parsed.deltas),
                )
            if parsed.unmatched:
                shown = ", ".join(parsed.unmatched[:UNMATCHED_SHOWN])
                loaded.warnings.append(
                    f"LoRA {info.name!r}: {len(parsed.unmatched)} keys match no layer of the model "
                    f"and were not applied (first: {shown})"
                )
            weight = spec.weight if spec.weight is not None else 1.0
            te_weight = spec.text_encoder_weight if spec.text_encoder_weight is not None else weight
            loaded.entries.append(StackEntry(parsed, weight, te_weight))
            loaded.infos.append(info)
        self._parsed.make_room()
        loaded.seconds = time.perf_counter() - start
        return loaded

    def _file(self, spec: LoraSpec, needed: set[str]) -> LoraInfo:
        try:
            info = self.files.get(spec.name, pinned=needed)
        except LoraError as exc:
            raise JobFailed(f"on this worker: {exc.message}") from None
        if spec.sha256 and info.sha256 != spec.sha256:
            raise JobFailed(
                f"LoRA {spec.name!r} on this worker has sha256 {info.short_hash}..., not the "
                f"{spec.sha256[:12]}... it had at submit: the file was replaced or imported again; submit again"
            )
        return info

    def _parse(self, info: LoraInfo, patcher: WeightPatcher) -> ParsedLora:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(info.path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise JobFailed(f"LoRA {info.name!r} cannot be read: {exc}") from None
        try:
            return parse_lora(
                state,
                patcher.index,
                info.format,
                metadata=info.metadata,
                original=patcher.original,
                device=self.device,
            )
        except LoraError as exc:
            raise JobFailed(f"LoRA {info.name!r} is refused: {exc.message}") from None
