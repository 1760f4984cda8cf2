"""What the deploy tests share: where the deploy files are, the defaults they must agree with, and
the real CLI that parses every ``lorafleet ...`` command line they hold.

Drift checks build on these: every ``lorafleet ...`` command line in an image, a compose file, a
manifest or docs/deploy.md parses with the real CLI (``parse_lorafleet``, ``lorafleet_calls``);
the worker's ``--models`` are read the way ``lorafleet worker`` reads them (``worker_models``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

from lorafleet.common.schema.settings import Settings
from lorafleet.producer.cli import app
from tests.helpers import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {name: DEPLOY / "docker" / f"{name}.Dockerfile" for name in ("api", "worker")}
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
KUSTOMIZATIONS = ["base", "overlays/production", "overlays/cpu-demo"]
K8S_VERSION = "1.32"
"""Kubernetes version the manifests are validated against (schemas from kubernetes-validate)."""

SETTINGS = {f"LORAFLEET_{name.upper()}" for name in Settings.model_fields}
API_PORT = Settings.model_fields["api_port"].default
VISIBILITY_TIMEOUT = Settings.model_fields["visibility_timeout"].default
SECRET_NAME = "lorafleet-secrets"


# --- the CLI: every `lorafleet ...` command line must parse -------------------------------

CLI = typer.main.get_command(app)
_SHELL_OPERATORS = re.compile(r"^[;&|()<>]+$")


def parse_lorafleet(args: list[str]) -> str:
    """Parse ``lorafleet ARGS`` with the real CLI (no command runs); the subcommand's path."""
    command = CLI
    path: list[str] = []
    args = list(args)
    while hasattr(command, "commands"):  # a group (Typer's own click: no isinstance)
        assert args, f"`lorafleet {' '.join(path)}` needs a subcommand (one of {sorted(command.commands)})"
        name = args.pop(0)
        assert name in command.commands, (
            f"`lorafleet {' '.join([*path, name])}`: no such command (allowed: {sorted(command.commands)})"
        )
        command = command.commands[name]
        path.append(name)
    try:
        command.make_context(" ".join(["lorafleet", *path]), args)
    except Exception as exc:  # click's usage errors, from the click that Typer uses
        if not hasattr(exc, "format_message"):
            raise
        raise AssertionError(f"`lorafleet {' '.join([*path, *args])}`: {exc.format_message()}") from exc
    return " ".join(path)


def _shell_words(script: str) -> list[str]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def check_lorafleet_calls(command: list[str] | str, where: str) -> int:
    """Parse every ``lorafleet`` call in ``command``, naming ``where`` on failure; how many."""
    calls = lorafleet_calls(command)
    for call in calls:
        try:
            parse_lorafleet(call)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    return len(calls)


def lorafleet_calls(argv: list[str] | str) -> list[list[str]]:
    """The arguments of each ``lorafleet`` call in a command (exec form, or a shell script)."""
    if isinstance(argv, str):
        words = _shell_words(argv)
    elif len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        words = _shell_words(argv[2])
    else:
        words = [str(word) for word in argv]
    calls: list[list[str]] = []
    current: list[str] | None = None
    at_start = True
    for word in words:
        if _SHELL_OPERATORS.match(word):
            current, at_start = None, True
            continue
        if current is not None:
            current.append(word)
        elif at_start and Path(word).name == "lorafleet":
            current = []
            calls.append(current)
        at_start = False
    return calls


def worker_models(args: list[str]) -> list[str]:
    models = CLI.commands["worker"].make_context("worker", args[1:]).params["models"]
    return [m.strip() for m in models.split(",") if m.strip()]
