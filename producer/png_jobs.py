"""A job from an image's generation parameters: regenerate a PNG, or start from one.

The image's parameters (common/schema/infotext.py) give prompt, negative prompt, sampler, steps,
CFG, seed, size, clip skip, model, VAE, LoRAs and the hires fix. Names are matched against what is
installed here; a LoRA, model or VAE named differently here is found by the hash the image
carries (A1111's hashes: a model's and a VAE's first 10 hex digits of the file's sha256, a
LoRA's first 12 of its tensor data's sha256; lorafleet's own PNGs: the file's sha256).
What is not installed is refused, naming it and its hash. Fields the writing tool used that
lorafleet does not reproduce (ADetailer, an A1111 img2img source, ...) come back as notes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.common.catalog.checkpoints import short_hash
from lorafleet.common.catalog.lora_files import LoraInfo, sha256_file
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import JobRejected, LoraError, ModelError, VaeError
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.infotext import Infotext, read_png
from lorafleet.common.schema.prompts import lora_tag, split_lora_tags

_TAG = re.compile(r"<(?:lora|lyco):[^>]*>", re.IGNORECASE)
_DIGEST = re.compile(r"^[0-9a-f]{10,64}$")
"""A hash long enough to name one file (A1111 writes 10 or 12 hex digits)."""


@dataclass
class PngJob:
    """The job fields an image gives, and what of the image will not be reproduced."""

    fields: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class PngReader:
    """Reads images into job fields, matching names and hashes against this installation."""

    def __init__(self, models: ModelRegistry, loras: LoraCatalog) -> None:
        self.models = models
        self.loras = loras
        self._by_hash: list[tuple[LoraInfo, str | None]] | None = None

    def read(self, path: Path, overrides: dict[str, Any] | None = None) -> PngJob:
        """The job fields of the image at ``path``, with ``overrides`` in place of its values.

        A ``prompt`` override keeps the image's LoRAs (as stack entries); a LoRA in a
        ``loras`` override replaces the image's LoRA of that name.
        """
        overrides = dict(overrides or {})
        info = read_png(Path(path))
        where = f"{Path(path).name}: "
        fields = info.job_fields(where)
        notes = [f"{where}{key} is not reproduced by lorafleet" for key in info.ignored]
        replaced = {spec.get("name") for spec in overrides.get("loras", []) if isinstance(spec, dict)}
        if info.source == "invokeai":
            fields["prompt_syntax"] = "compel"
            loras = [
                {"name": self._lora_name(name, digest, where), "weight": weight}
                for name, weight, digest in info.loras
            ]
        else:
            prompt, loras = self._prompt_and_tags(info, where, replaced, keep_text="prompt" not in overrides)
            fields["prompt"] = prompt
        fields["loras"] = [*overrides.pop("loras", []), *(s for s in loras if s["name"] not in replaced)]
        if "model" not in overrides:
            fields["model"] = self._model(info, where)
        if "vae" not in overrides and "VAE" in info.fields:
            fields["vae"] = self._vae(info, where)
        model = overrides.get("model") or fields.get("model", "")
        if (
            "clip_skip" in fields
            and info.source == "a1111"
            and not info.by_lorafleet
            and self._is_sdxl(model)
        ):
            del fields["clip_skip"]  # A1111 writes it for SDXL but does not apply it there
            notes.append(f"{where}Clip skip is ignored: A1111 does not apply it to SDXL models")
        return PngJob(fields=fields | overrides, notes=notes)

    def _is_sdxl(self, model: str) -> bool:
        try:
            return self.models.get(model).family is Family.sdxl
        except ModelError:
            return False

    # ------------------------------------------------------------------ LoRAs
    def _prompt_and_tags(
        self, info: Infotext, where: str, replaced: set, *, keep_text: bool
    ) -> tuple[str, list[dict[str, Any]]]:
        """The prompt with each tag naming an installed LoRA (found by hash where the name is
        not installed) and without the tags of ``replaced`` LoRAs; with ``keep_text`` False,
        every tag comes out of the text as a stack entry instead."""
        hashes = info.lora_hashes
        taken: list[dict[str, Any]] = []

        def rename(match: re.Match) -> str:
            tag = match.group(0)
            [parsed] = split_lora_tags(tag)[1]
            name = self._lora_name(parsed.name, hashes.get(parsed.name), where)
            if name in replaced:
                return ""
            if not keep_text:
                spec = {
                    "name": name,
                    "weight": parsed.weight,
                    "text_encoder_weight": parsed.text_encoder_weight,
                }
                taken.append({k: v for k, v in spec.items() if v is not None})
                return ""
            if name == parsed.name:
                return tag
            return (
                lora_tag(name, parsed.weight, parsed.text_encoder_weight)
                if parsed.weight is not None
                else f"<lora:{name}>"
            )

        try:
            text = _TAG.sub(rename, info.prompt)
        except ValueError as exc:
            raise JobRejected(f"{where}{exc}", field="prompt") from None
        if text != info.prompt:
            text = re.sub(r"[ \t]{2,}", " ", text).strip()
        return text, taken

    def _lora_name(self, name: str, digest: str | None, where: str) -> str:
        try:
            return self.loras.get(name).name
        except LoraError as exc:
            unknown = exc
        if digest and _DIGEST.match(digest):
            for candidate, tensor_hash in self._hash_index():
                if candidate.sha256.startswith(digest) or (tensor_hash and tensor_hash.startswith(digest)):
                    return candidate.name
        raise JobRejected(
            f"{where}LoRA {name!r}" + (f" (hash {digest})" if digest else "") + " is not installed here",
            field="prompt",
            allowed=unknown.allowed + "; or pass the stack yourself (--lora / loras)",
        )

    def _hash_index(self) -> list[tuple[LoraInfo, str | None]]:
        """Every installed LoRA with its tensor-data hash (A1111's) where the file is here."""
        if self._by_hash is None:
            usable, _ = self.loras.scan()
            self._by_hash = [
                (info, sha256_file(info.path, skip_header=True) if info.path else None) for info in usable
            ]
        return self._by_hash

    # ------------------------------------------------------------------ model and VAE
    def _model(self, info: Infotext, where: str) -> str:
        name, digest = info.fields.get("Model"), info.fields.get("Model hash", "").lower()
        if name:
            try:
                return self.models.get(name).key
            except ModelError:
                pass
        if _DIGEST.match(digest):
            for candidate in self.models.names():
                try:
                    ref = self.models.get(candidate)
                except ModelError:
                    continue
                if (
                    ref.single_file
                    and ref.path
                    and ref.path.is_file()
                    and short_hash(ref.path) == digest[:10]
                ):
                    return ref.key
        if not name and not digest:
            raise JobRejected(f"{where}the image names no model", field="model", allowed="give one (--model)")
        raise JobRejected(
            f"{where}model {name!r}" + (f" (hash {digest})" if digest else "") + " is not installed here",
            field="model",
            allowed=f"one of {', '.join(self.models.names()) or 'none yet'}, or give one (--model)",
        )

    def _vae(self, info: Infotext, where: str) -> str:
        name = info.fields["VAE"]
        stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
        digest = info.fields.get("VAE hash", "").lower()
        try:
            return self.models.vaes.get(stem).name
        except VaeError as exc:
            unknown = exc
        if _DIGEST.match(digest):
            for candidate in self.models.vaes.names():
                try:
                    vae = self.models.vaes.get(candidate)
                except VaeError:
                    continue
                if vae.short_hash == digest[:10]:
                    return vae.name
        raise JobRejected(
            f"{where}VAE {name!r}" + (f" (hash {digest})" if digest else "") + " is not installed here",
            field="vae",
            allowed=unknown.allowed,
        )
