"""Prompts as A1111 and Forge write them: LoRA tags, attention weights and BREAK.

Pure text work, shared by the producer (LoRA tags become the job's stack at submit) and the
worker (weights and BREAK become the text embeddings). No torch here.

Semantics (A1111's prompt syntax):

- ``<lora:NAME>``, ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>`` and the named forms
  ``te=`` / ``unet=`` are LoRA tags (``lyco`` is read as ``lora``). As in A1111 the first
  number is the text-encoder weight and the second the UNet weight; one number is both.
  Tags are removed from the text the encoder sees.
- ``(text)`` multiplies the attention weight of ``text`` by 1.1, ``[text]`` divides it by
  1.1, ``(text:W)`` multiplies it by W; brackets nest (weights multiply) and a bracket left
  open runs to the end. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the characters
  themselves.
- ``BREAK`` (the upper-case word) ends the current 75-token chunk: what follows starts a
  new one.

compel is the usual prompt-weighting library for diffusers, and a job whose
``prompt_syntax`` is ``compel`` (InvokeAI's syntax) goes to it. But compel reads its own
syntax (``word+``, ``(word)1.3``, ``.and()``), not A1111's, has no BREAK, and weights
differently (it blends toward the empty prompt and masks down-weighted words), so a prompt
pasted from an A1111 PNG would give another picture through it: for A1111's syntax this
module and worker/prompt_encoding.py follow A1111.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum


class PromptSyntax(str, Enum):
    """How a job's prompts are read: A1111's syntax (this module) or compel's, InvokeAI's
    syntax (``word+``, ``(words)1.3``, ``("a", "b").blend(0.7, 0.3)``, ``.and()``), which
    the worker hands to compel itself."""

    a1111 = "a1111"
    compel = "compel"


A1111_TAG_WEIGHT = 1.0
"""A1111's text-encoder weight for a tag that names only ``unet=`` (a tag with no number at
all takes lorafleet's default weight instead, from InvokeAI's LoRA guidance)."""

ATTENTION_STEP = 1.1
"""What one pair of round brackets multiplies a weight by (square brackets divide by it)."""

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]*)>")
_LORA_KINDS = {"lora", "lyco"}
_REFUSED_KINDS = {"hypernet": "hypernetworks are not supported; use a LoRA"}
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_ATTENTION = re.compile(
    r"\\[\\()\[\]]|\\|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|\]|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: ``weight`` is the UNet weight, None where the tag gives none."""

    name: str
    weight: float | None
    text_encoder_weight: float | None
    text: str
    """The tag as written, for messages."""


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one attention weight; ``is_break`` marks a BREAK."""

    text: str
    weight: float = 1.0
    is_break: bool = False


BREAK = Fragment("BREAK", 1.0, is_break=True)


def _number(value: str, tag: str) -> float:
    if not _NUMBER.match(value.strip()):
        raise ValueError(f"LoRA tag {tag}: {value!r} is not a number (write e.g. <lora:NAME:0.8>)")
    return float(value)


def _lora_tag(kind: str, body: str, text: str) -> LoraTag:
    items = body.split(":")
    name = items[0].strip()
    if not name:
        raise ValueError(f"LoRA tag {text} has no LoRA name (write <{kind}:NAME:WEIGHT>)")
    positional: list[float] = []
    named: dict[str, float] = {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if sep:
            key = key.strip()
            if key not in ("te", "unet"):
                raise ValueError(f"LoRA tag {text}: {key}= is not supported (allowed: te=, unet=)")
            named[key] = _number(value, text)
        else:
            positional.append(_number(item, text))
    if len(positional) > 2:
        raise ValueError(f"LoRA tag {text} has {len(positional)} numbers; at most 2 (text encoder, UNet)")
    te = named.get("te", positional[0] if positional else None)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    if te is None and unet is not None:
        te = A1111_TAG_WEIGHT  # <lora:x:unet=0.5>: A1111 leaves the text encoder at 1
    return LoraTag(
        name=name,
        weight=unet,
        text_encoder_weight=te if te is not None and te != unet else None,
        text=text,
    )


def split_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its LoRA tags, and the tags in the order written.

    ValueError names a tag that cannot be read. Other ``<kind:...>`` tags (an extension's
    network lorafleet does not know; ``other_tags`` lists them) are taken out of the text
    too, as A1111 takes them out.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind = match.group(1).lower()
        if kind in _REFUSED_KINDS:
            raise ValueError(f"{match.group(0)}: {_REFUSED_KINDS[kind]}")
        if kind not in _LORA_KINDS:
            return ""
        tags.append(_lora_tag(kind, match.group(2), match.group(0)))
        return ""

    text = _EXTRA_NETWORK.sub(take, prompt)
    if text != prompt:
        text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text, tags


def other_tags(prompt: str) -> list[str]:
    """The ``<kind:...>`` tags in ``prompt`` that are not LoRA tags (A1111 drops them unused)."""
    return [
        m.group(0)
        for m in _EXTRA_NETWORK.finditer(prompt)
        if m.group(1).lower() not in _LORA_KINDS | set(_REFUSED_KINDS)
    ]


def lora_tag(name: str, weight: float, text_encoder_weight: float | None = None) -> str:
    """The tag A1111 reads back as this LoRA at these weights."""
    if text_encoder_weight is None or text_encoder_weight == weight:
        return f"<lora:{name}:{format_number(weight)}>"
    return f"<lora:{name}:{format_number(text_encoder_weight)}:{format_number(weight)}>"


def format_number(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``1`` rather than ``1.0``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def parse_attention(prompt: str) -> list[Fragment]:
    """The prompt as runs of text with their attention weights, BREAKs in between.

    Adjacent runs of equal weight are merged; a prompt with no syntax at all comes back as
    one fragment of weight 1.0 holding the prompt unchanged.
    """
    parts: list[list] = []  # [text, weight, is_break]
    open_brackets: list[tuple[str, int]] = []

    def close(kind: str, factor: float) -> bool:
        for depth in range(len(open_brackets) - 1, -1, -1):
            if open_brackets[depth][0] == kind:
                start = open_brackets.pop(depth)[1]
                for part in parts[start:]:
                    part[1] *= factor
                return True
        return False

    for match in _ATTENTION.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped character, or a lone backslash (dropped, as A1111 does)
            if len(token) == 2:
                parts.append([token[1], 1.0, False])
        elif token == "(":
            open_brackets.append(("(", len(parts)))
        elif token == "[":
            open_brackets.append(("[", len(parts)))
        elif weight is not None and any(kind == "(" for kind, _ in open_brackets):
            close("(", float(weight))
        elif token == ")" and close("(", ATTENTION_STEP):
            pass
        elif token == "]" and close("[", 1 / ATTENTION_STEP):
            pass
        else:
            pieces = _BREAK.split(token)
            for index, piece in enumerate(pieces):
                if index:
                    parts.append(["BREAK", 1.0, True])
                if piece:
                    parts.append([piece, 1.0, False])
    for kind, start in reversed(open_brackets):
        factor = ATTENTION_STEP if kind == "(" else 1 / ATTENTION_STEP
        for part in parts[start:]:
            part[1] *= factor
    merged: list[Fragment] = []
    for text, weight, is_break in parts:
        if is_break:
            merged.append(BREAK)
        elif merged and not merged[-1].is_break and merged[-1].weight == weight:
            merged[-1] = Fragment(merged[-1].text + text, weight)
        else:
            merged.append(Fragment(text, weight))
    return merged or [Fragment("", 1.0)]


def is_plain(prompt: str) -> bool:
    """Whether the prompt means its own characters: no weights, escapes or BREAK."""
    return parse_attention(prompt) == [Fragment(prompt, 1.0)]


def check_weights(prompt: str) -> None:
    """ValueError if an attention weight is not a finite number."""
    for fragment in parse_attention(prompt):
        if not math.isfinite(fragment.weight):
            raise ValueError(f"the weight of {fragment.text!r} is not a finite number")


def plain_text(prompt: str) -> str:
    """The prompt's words without A1111's syntax: weights and brackets dropped, escapes
    unescaped, BREAK a space. What a T5 or LLM encoder reads (Forge does the same)."""
    text = "".join(" " if fragment.is_break else fragment.text for fragment in parse_attention(prompt))
    return re.sub(r"\s{2,}", " ", text).strip() if text != prompt else text
