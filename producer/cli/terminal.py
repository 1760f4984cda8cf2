"""What every `lorafleet` command shares: consoles, exit codes, errors as messages."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import redis
import typer
from rich.console import Console
from rich.markup import escape

from lorafleet.common.schema.errors import ConfigError, InvalidInput, LorafleetError, TransientError

console = Console()
errors = Console(stderr=True)

EXIT_JOB_FAILED = 1
"""A job ended failed or cancelled, or a wait timed out."""
EXIT_REJECTED = 2
"""The input was refused; the message names the field and what is allowed."""
EXIT_UNAVAILABLE = 3
"""lorafleet cannot work here: configuration, broker or storage."""

T = TypeVar("T")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """User-supplied text (a prompt, a tag, a LoRA's name or metadata, an error quoting them)
    made fit for the terminal: control characters shown as ``\\xNN``, so no text can move the
    cursor, clear the screen or retitle the window, and rich's markup escaped."""
    return escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


def fail(message: str, code: int) -> NoReturn:
    errors.print(f"[red]error:[/] {safe(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run(action: Callable[[], T]) -> T:
    """Run ``action`` and turn lorafleet's errors into messages and exit codes."""
    try:
        return action()
    except InvalidInput as exc:
        for field, message in exc.problems:
            errors.print(
                f"[red]refused:[/] [bold]{safe(field)}[/]: {safe(message)}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_REJECTED) from None
    except (ConfigError, TransientError) as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    except (TimeoutError, LorafleetError) as exc:
        fail(str(exc), EXIT_JOB_FAILED)
    except redis.RedisError as exc:  # the broker went away mid-command
        fail(f"the broker failed: {exc}", EXIT_UNAVAILABLE)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
