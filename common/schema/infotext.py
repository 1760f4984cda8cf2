"""Generation parameters stored in images: A1111's "parameters" text, InvokeAI's metadata.

A1111, Forge and lorafleet write a "parameters" PNG text chunk (worker/outputs.py writes
lorafleet's)::

    <prompt, one or more lines>
    Negative prompt: <negative prompt, one or more lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x768, ...

The last line holds the fields, ``Key: value`` separated by commas; a value with a comma,
colon or quote in it is written as a JSON string. InvokeAI writes an ``invokeai_metadata``
chunk of JSON instead. Both are read into an Infotext, and ``Infotext.job_fields`` turns it
into the fields of a GenerationJob; matching LoRAs and models that are named differently
here (by hash) is the producer's work (producer/png_jobs.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.common.schema import samplers
from lorafleet.common.schema.errors import BadArgument

PARAMETERS_CHUNK = "parameters"
INVOKEAI_CHUNK = "invokeai_metadata"
NEGATIVE_PREFIX = "Negative prompt:"

_FIELD = re.compile(r'\s*([A-Za-z][\w \-/+.()]{0,63}?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)\s*x\s*(\d+)$")
MAX_PARAMETERS_CHARS = 64 * 1024
"""Longest parameters text read (A1111's are a few hundred characters; a hostile one could be
megabytes)."""
_MODULE = re.compile(r"^Module \d+$")
"""Forge's ``Module N``: the separate VAE and text encoders a model ran with; the model's
registration (its base) says the same, so they are read as known, not reproduced."""
INPUT_FIELDS = {
    "Init image",
    "Mask image",
    "Denoising strength",
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
}
"""An img2img or inpainting job's fields: A1111's names, and lorafleet's ``Init image`` and
``Mask image`` (the inputs' sha256 in the object store) without which they cannot be reproduced."""
LORAFLEET_FIELDS = {"Batch size", "LoRA mode", "IP-Adapter", "IP-Adapter images"} | INPUT_FIELDS
"""Fields read back only from lorafleet's own PNGs (A1111's "Batch size" means its own batch;
its img2img PNGs do not say which image they started from)."""
HIRES_FIELDS = {"Hires upscale", "Hires steps", "Hires upscaler", "Denoising strength"}
"""A1111's hires fix, read from any A1111, Forge or lorafleet PNG."""
_CONTROLNET = re.compile(r"^ControlNet (\d+)( image)?$")
"""A1111's ``ControlNet N`` units; lorafleet adds ``ControlNet N image`` (the map's sha256 name)."""
_MIN_FIELDS = 3
"""A last line with fewer ``Key: value`` pairs than this is prompt text, not fields."""

USED_FIELDS = {
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Distilled CFG Scale",
    "Seed",
    "Size",
    "Model",
    "Model hash",
    "VAE",
    "VAE hash",
    "Clip skip",
    "Lora hashes",
    "TI hashes",
    "Version",
    "Prompt syntax",
}
"""Fields lorafleet reproduces (or reads to match files); any other is reported as ignored."""

INVOKEAI_IGNORED = (
    "cfg_rescale_multiplier",
    "positive_style_prompt",
    "negative_style_prompt",
    "refiner_model",
    "hrf_enabled",
    "strength",
    "init_image",
    "controlnets",
    "ipAdapters",
    "t2iAdapters",
    "seamless_x",
    "seamless_y",
)
"""InvokeAI metadata that changes the picture but that lorafleet does not reproduce."""

INVOKEAI_SCHEDULERS = {
    "euler": "euler",
    "euler_a": "euler_a",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_k": "dpmpp_2m_karras",
    "dpmpp_2m_sde_k": "dpmpp_2m_sde_karras",
    "dpmpp_sde_k": "dpmpp_sde_karras",
    "unipc": "unipc",
    "lcm": "lcm",
    "tcd": "tcd",
    "ddim": "ddim",
}
"""InvokeAI's scheduler names to lorafleet's samplers (the ones both have)."""


def quote(value: str) -> str:
    """A field value as A1111 writes it: a JSON string when it holds ``,``, ``:`` or ``"``."""
    if any(c in value for c in ',:"\n'):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    return value


def hash_list(value: str) -> dict[str, str]:
    """``name: hash, name: hash`` (Lora hashes, TI hashes) as a dict."""
    pairs = {}
    for item in value.split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            pairs[name.strip()] = digest.strip().lower()
    return pairs


@dataclass
class Infotext:
    """What an image says about how it was made."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    source: str = "a1111"
    """Which tool's format: ``a1111`` (A1111, Forge and lorafleet) or ``invokeai``."""
    loras: list[tuple[str, float, str | None]] = field(default_factory=list)
    """InvokeAI's LoRAs: (name, weight, hash); A1111's are tags in the prompt."""
    unused: list[str] = field(default_factory=list)
    """InvokeAI's settings that change the picture but are not reproduced here."""

    @property
    def ignored(self) -> list[str]:
        """Fields that change the picture in the tool that wrote them but are not reproduced here."""
        used = USED_FIELDS | (LORAFLEET_FIELDS if self.by_lorafleet else set())
        if "Hires upscale" in self.fields:  # A1111's hires fix, reproduced (its strength with it)
            used = used | HIRES_FIELDS
        read = [key for key in self.fields if self.by_lorafleet and _CONTROLNET.match(key)]
        return [
            key for key in self.fields if key not in used and key not in read and not _MODULE.match(key)
        ] + self.unused

    @property
    def by_lorafleet(self) -> bool:
        return self.fields.get("Version", "").startswith("lorafleet")

    @property
    def lora_hashes(self) -> dict[str, str]:
        return hash_list(self.fields.get("Lora hashes", ""))

    def job_fields(self, where: str = "") -> dict[str, Any]:
        """The GenerationJob fields this image's parameters give; BadArgument names a field
        whose value cannot be read (``where`` names the image in messages)."""
        job: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        fields = self.fields
        for key, name, kind in (
            ("Steps", "steps", int),
            ("CFG scale", "cfg_scale", float),
            ("Distilled CFG Scale", "guidance", float),
            ("Seed", "seed", int),
            ("Clip skip", "clip_skip", int),
        ):
            if key in fields:
                job[name] = _number(fields[key], kind, f"{where}{key}")
        if "Size" in fields:
            match = _SIZE.match(fields["Size"].strip())
            if not match:
                raise BadArgument(f"{fields['Size']!r} is not WIDTHxHEIGHT", field=f"{where}Size")
            job["width"], job["height"] = int(match.group(1)), int(match.group(2))
        if "Sampler" in fields:
            try:
                sampler = samplers.from_a1111(fields["Sampler"], fields.get("Schedule type"))
            except ValueError as exc:
                raise BadArgument(str(exc), field=f"{where}Sampler") from None
            job["sampler"] = sampler.value
        if "Model" in fields:
            job["model"] = fields["Model"]
        if "Batch size" in fields and self.by_lorafleet:  # the rows of the call: lorafleet's meaning
            job["batch_size"] = _number(fields["Batch size"], int, f"{where}Batch size")
        if self.by_lorafleet and (mode := fields.get("LoRA mode", "").strip() or None) is not None:
            job["lora_mode"] = mode
        elif self.by_lorafleet and "Lora hashes" in fields:  # written before side paths: merged
            job["lora_mode"] = "merge"
        if self.by_lorafleet and "Init image" in fields:  # the inputs, by sha256 in the object store
            job["init_image"] = fields["Init image"].strip()
            if "Mask image" in fields:
                job["mask_image"] = fields["Mask image"].strip()
                if "Mask blur" in fields:
                    job["mask_blur"] = _number(fields["Mask blur"], int, f"{where}Mask blur")
                if fields.get("Inpaint area", "").strip() == "Only masked":
                    padding = fields.get("Masked area padding", "32")
                    job["inpaint_padding"] = _number(padding, int, f"{where}Masked area padding")
            if "Denoising strength" in fields:
                job["strength"] = _number(fields["Denoising strength"], float, f"{where}Denoising strength")
        if self.by_lorafleet:
            job["controlnets"] = self._controlnets(where)
        if self.by_lorafleet and "IP-Adapter" in fields and "IP-Adapter images" in fields:
            parts = _unit_fields(fields["IP-Adapter"])
            job["ip_adapter"] = {
                "model": parts.get("Model", "").rsplit(" [", 1)[0],
                "images": fields["IP-Adapter images"].strip('"').split(),
                "weight": _number(parts.get("Weight", "1"), float, f"{where}IP-Adapter Weight"),
            }
        if "Hires upscale" in fields and "Init image" not in fields:
            job["hr_scale"] = _number(fields["Hires upscale"], float, f"{where}Hires upscale")
            job["hr_upscaler"] = fields.get("Hires upscaler", "Latent").strip()
            steps = _number(fields.get("Hires steps", "0"), int, f"{where}Hires steps")
            if steps:  # A1111 writes 0 for "the first pass's steps"
                job["hr_steps"] = steps
            if "Denoising strength" in fields:
                job["hr_strength"] = _number(
                    fields["Denoising strength"], float, f"{where}Denoising strength"
                )
        if "Prompt syntax" in fields:  # lorafleet's own field, for prompts in compel's syntax
            job["prompt_syntax"] = fields["Prompt syntax"]
        return job

    def _controlnets(self, where: str) -> list[dict[str, Any]]:
        """lorafleet's ControlNet units: A1111's ``Model: name [hash], Weight ...`` and the map."""
        units = []
        for n in range(len(self.fields)):
            unit, image = self.fields.get(f"ControlNet {n}"), self.fields.get(f"ControlNet {n} image")
            if unit is None or image is None:
                break
            parts = _unit_fields(unit)
            spec: dict[str, Any] = {
                "model": parts.get("Model", "").rsplit(" [", 1)[0],
                "image": image.strip(),
            }
            for key, name in (("Weight", "weight"), ("Guidance Start", "start"), ("Guidance End", "end")):
                if key in parts:
                    spec[name] = _number(parts[key], float, f"{where}ControlNet {n} {key}")
            units.append(spec)
        return units


def _unit_fields(unit: str) -> dict[str, str]:
    """A unit's own ``Key: value, Key: value`` text (A1111's ``ControlNet N``, lorafleet's
    ``IP-Adapter``), quoted or not, as a dict; a part without ``": "`` is skipped."""
    parts = (part.split(": ", 1) for part in unit.strip('"').split(", "))
    return {part[0]: part[1] for part in parts if len(part) == 2}


def _number(value: str, kind: type, field_name: str) -> int | float:
    try:
        return kind(value.strip())
    except ValueError:
        raise BadArgument(
            f"{value!r} is not a {'whole ' if kind is int else ''}number", field=field_name
        ) from None


def parse_parameters(text: str) -> Infotext:
    """A1111's parameters text (as A1111, Forge and lorafleet write it) as an Infotext."""
    if len(text) > MAX_PARAMETERS_CHARS:
        raise BadArgument(
            f"the parameters text is {len(text)} characters, longer than A1111 writes",
            field=PARAMETERS_CHUNK,
            allowed=f"at most {MAX_PARAMETERS_CHARS}",
        )
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= _MIN_FIELDS:
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = unquote(value)
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if negative_lines or line.startswith(NEGATIVE_PREFIX):
            negative_lines.append(line[len(NEGATIVE_PREFIX) :] if not negative_lines else line)
        else:
            prompt_lines.append(line)
    return Infotext(
        prompt="\n".join(prompt_lines).strip(),
        negative_prompt="\n".join(negative_lines).strip(),
        fields=fields,
    )


def _name(entry: Any) -> str | None:
    """A model's name in InvokeAI's metadata (v3 ``model_name``, v4 ``name``)."""
    if isinstance(entry, dict):
        for key in ("name", "model_name"):
            if isinstance(entry.get(key), str):
                return entry[key]
    return None


def parse_invokeai(data: dict) -> Infotext:
    """InvokeAI's ``invokeai_metadata`` JSON as an Infotext (its fields named as A1111 names them)."""
    fields: dict[str, str] = {}
    for key, name in (("steps", "Steps"), ("cfg_scale", "CFG scale"), ("seed", "Seed")):
        if isinstance(data.get(key), (int, float)):
            fields[name] = str(data[key])
    if isinstance(data.get("clip_skip"), int):  # InvokeAI counts the layers skipped: 0 is A1111's 1
        fields["Clip skip"] = str(data["clip_skip"] + 1)
    if data.get("width") and data.get("height"):
        fields["Size"] = f"{data['width']}x{data['height']}"
    scheduler = data.get("scheduler")
    if isinstance(scheduler, str):
        if scheduler not in INVOKEAI_SCHEDULERS:
            raise BadArgument(
                f"InvokeAI's scheduler {scheduler!r} has no lorafleet sampler",
                field="scheduler",
                allowed=", ".join(sorted(INVOKEAI_SCHEDULERS)),
            )
        fields["Sampler"] = INVOKEAI_SCHEDULERS[scheduler]
    model = data.get("model")
    if _name(model):
        fields["Model"] = _name(model)
        if isinstance(model.get("hash"), str):
            fields["Model hash"] = model["hash"].split(":")[-1].lower()
    if _name(data.get("vae")):
        fields["VAE"] = _name(data["vae"])
    loras = []
    entries = data.get("loras")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        lora = entry.get("model") or entry.get("lora")
        name, weight = _name(lora), entry.get("weight")
        if name and isinstance(weight, (int, float)):
            digest = lora.get("hash") if isinstance(lora.get("hash"), str) else None
            loras.append((name, float(weight), digest.split(":")[-1].lower() if digest else None))
    return Infotext(
        prompt=str(data.get("positive_prompt") or ""),
        negative_prompt=str(data.get("negative_prompt") or ""),
        fields=fields,
        source="invokeai",
        loras=loras,
        unused=[key for key in INVOKEAI_IGNORED if data.get(key) not in (None, False, [], "", 0)],
    )


def read_png(path: Path) -> Infotext:
    """The generation parameters stored in an image file; BadArgument when it has none."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            # info: the text chunks before the pixels, where A1111 and lorafleet write them,
            # read without decoding the image (``.text`` would decode it to reach later chunks)
            text = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # OSError: not an image; ValueError: a text chunk that inflates past Pillow's limit;
        # SyntaxError: a broken chunk; DecompressionBombError: absurd dimensions
        raise BadArgument(f"cannot read {path.name} as an image: {exc}", field=str(path)) from None
    if text.get(PARAMETERS_CHUNK):
        return parse_parameters(text[PARAMETERS_CHUNK])
    if text.get(INVOKEAI_CHUNK):
        try:
            data = json.loads(text[INVOKEAI_CHUNK])
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict):
            return parse_invokeai(data)
    raise BadArgument(
        f"{path.name} carries no generation parameters",
        field=str(path),
        allowed="a PNG written by lorafleet, A1111, Forge or InvokeAI (a 'parameters' or "
        "'invokeai_metadata' text chunk); images re-saved by other programs often lose it",
    )
