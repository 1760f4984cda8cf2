"""What a name in a drop folder may be: a plain file name that a prompt's
``<lora:NAME:WEIGHT>`` tag can spell (LoRAs, and the other drop folders' names alike)."""

from __future__ import annotations

import re

_LORA_NAME_BAD = re.compile(r"[/\\\x00-\x1f\x7f]")


_TAG_BREAKING = re.compile(r"[:<>]")


def check_lora_name(name: str) -> None:
    """ValueError unless ``name`` can only mean a file inside the LoRA folder, and can be
    written in a prompt's ``<lora:NAME:WEIGHT>`` tag."""
    if _TAG_BREAKING.search(name or ""):
        raise ValueError("must not contain ':', '<' or '>' (a <lora:NAME:WEIGHT> tag could not spell it)")
    if not name or _LORA_NAME_BAD.search(name) or name.startswith(".") or name.strip() != name:
        raise ValueError(
            "must be a plain LoRA name: no path separators, control characters, "
            "leading dot or surrounding spaces"
        )
