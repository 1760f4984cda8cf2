"""The worker's LoRAs: found by name and hash, parsed once per model, kept on the device.

A job names each LoRA and carries the sha256 the producer resolved at submit. The worker
finds the file in its own drop folder, checks the hash (a file replaced since submit is an
error, not a surprise), parses it against the model's layers, and keeps the parsed factors
on the device in an LRU within a byte budget, keyed by (model, sha256).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from lorafleet.common.errors import JobFailed
from lorafleet.common.jobs import LoraSpec
from lorafleet.common.lora_catalog import LoraCatalog, LoraInfo
from lorafleet.worker.lora_formats import LoraFormatError, ParsedLora, parse_lora
from lorafleet.worker.patcher import StackEntry, WeightPatcher

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

    def __init__(self, catalog: LoraCatalog, device: torch.device, budget_bytes: int) -> None:
        self.catalog = catalog
        self.device = device
        self.budget_bytes = budget_bytes
        self._cache: OrderedDict[tuple[str, str], ParsedLora] = OrderedDict()
        self._names: dict[str, str] = {}  # sha256 -> the name it was last loaded by

    @property
    def cached_bytes(self) -> int:
        return sum(p.nbytes for p in self._cache.values())

    def cached(self) -> list[tuple[str, str]]:
        return list(self._cache)

    def cached_names(self) -> list[str]:
        """'name (sha256 prefix)' of every cached LoRA, most recently used last."""
        return [f"{self._names.get(sha, '?')} ({sha[:12]})" for _, sha in self._cache]

    def stack(self, model_key: str, patcher: WeightPatcher, specs: list[LoraSpec]) -> LoadedStack:
        """Load (or take from the cache) every LoRA of a job, in stack order."""
        loaded = LoadedStack()
        start = time.perf_counter()
        pinned = set()
        in_use = {spec.sha256 for spec in specs if spec.sha256}
        for spec in specs:
            info = self._info(spec, in_use)
            key = (model_key, info.sha256)
            self._names[info.sha256] = info.name
            parsed = self._cache.get(key)
            if parsed is not None:
                self._cache.move_to_end(key)
                loaded.hits += 1
                logger.info("LoRA cache hit: %s (%s)", info.name, info.short_hash)
            else:
                parsed = self._parse(info, patcher)
                self._cache[key] = parsed
                loaded.misses += 1
                logger.info(
                    "LoRA cache miss: %s (%s) parsed, %d layers",
                    info.name,
                    info.short_hash,
                    len(parsed.deltas),
                )
            pinned.add(key)
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
        self._evict(keep=pinned)
        loaded.seconds = time.perf_counter() - start
        return loaded

    def _info(self, spec: LoraSpec, in_use: set[str]) -> LoraInfo:
        try:
            info = self.catalog.on_disk(spec.name, in_use=in_use)
        except (OSError, ValueError) as exc:
            raise JobFailed(f"LoRA {spec.name!r} is refused: {exc}") from None
        if info is None:
            where = " or the shared registry" if self.catalog.shared else ""
            raise JobFailed(f"LoRA {spec.name!r} is not in this worker's folder {self.catalog.folder}{where}")
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
        except LoraFormatError as exc:
            raise JobFailed(f"LoRA {info.name!r} is refused: {exc}") from None

    def _evict(self, keep: set[tuple[str, str]]) -> None:
        while self.cached_bytes > self.budget_bytes:
            victim = next((k for k in self._cache if k not in keep), None)
            if victim is None:
                return
            del self._cache[victim]
            logger.info("LoRA cache evicted %s", victim[1][:12])
