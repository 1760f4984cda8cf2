"""The one way from the `lorafleet` command to the worker side (torch, diffusers).

Nothing else under ``lorafleet.producer`` imports ``lorafleet.worker``, even lazily: the
worker commands and `loras inspect` ask for its modules here, when they run, and a
producer-only install gets a message that says how to add the worker side.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lorafleet.producer.cli.terminal import EXIT_UNAVAILABLE, fail


def worker_side(module: str) -> ModuleType:
    """Import ``lorafleet.worker.<module>``, or say how to install the worker side."""
    try:
        return importlib.import_module(f"lorafleet.worker.{module}")
    except ImportError as exc:
        if (exc.name or "").startswith("lorafleet."):
            raise  # lorafleet's own module is missing: a bug here, not a missing install
        fail(
            f"this command runs on the worker side, which needs torch and diffusers ({exc}); "
            "install it with: pip install 'lorafleet[worker]'",
            EXIT_UNAVAILABLE,
        )
