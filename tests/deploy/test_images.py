"""The container images (deploy/docker/*.Dockerfile) agree with the code.

Each image runs a real ``lorafleet`` command (parsed with the real CLI) as a non-root user with a
healthcheck; the API image listens on the port its healthcheck and EXPOSE name; the worker image
installs torch from a wheel index before the worker extra; .dockerignore keeps what the images copy.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.deploy.manifests import (
    API_PORT,
    DOCKERFILES,
    check_lorafleet_calls,
    lorafleet_calls,
    parse_lorafleet,
)
from tests.helpers import REPO


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in joined]


def _docker_command(text: str) -> list[str] | str:
    """Exec form (a JSON list) as a list, shell form as the script."""
    return json.loads(text) if text.startswith("[") else text


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, text in dockerfile_instructions(path):
        if instruction == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(text))
    return env


def dockerfile_commands(path: Path) -> list[list[str] | str]:
    commands = []
    for instruction, text in dockerfile_instructions(path):
        if instruction == "HEALTHCHECK":
            text = text[text.index("CMD ") + 4 :].strip()
            instruction = "CMD"
        if instruction in ("CMD", "ENTRYPOINT", "RUN"):
            commands.append(_docker_command(text))
    return commands


def test_images_run_real_commands_as_non_root_with_a_healthcheck():
    for name, path in DOCKERFILES.items():
        instructions = dockerfile_instructions(path)
        kinds = [instruction for instruction, _ in instructions]
        assert "HEALTHCHECK" in kinds, f"{path.name}: no HEALTHCHECK"
        users = [text for instruction, text in instructions if instruction == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: runs as root"
        for folder in ("common/", "producer/", "worker/"):
            assert any(i == "COPY" and text.startswith(folder) for i, text in instructions), (
                f"{path.name}: does not COPY {folder} (pyproject maps a package to it)"
            )
        cmd = [text for instruction, text in instructions if instruction == "CMD"][-1]
        calls = lorafleet_calls(_docker_command(cmd))
        assert calls, f"{path.name}: the entry is not a lorafleet command"
        assert parse_lorafleet(calls[0]) == {"api": "serve", "worker": "worker"}[name]
        for command in dockerfile_commands(path):
            check_lorafleet_calls(command, path.name)


def test_the_api_image_listens_where_its_healthcheck_and_expose_look():
    path = DOCKERFILES["api"]
    env = dockerfile_env(path)
    port = int(env.get("LORAFLEET_API_PORT", API_PORT))
    assert env.get("LORAFLEET_API_HOST") == "0.0.0.0"
    instructions = dockerfile_instructions(path)
    exposed = {int(word.split("/")[0]) for i, text in instructions if i == "EXPOSE" for word in text.split()}
    assert exposed == {port}
    healthcheck = next(text for i, text in instructions if i == "HEALTHCHECK")
    assert [int(p) for p in re.findall(r"http://[^/:'\"]+:(\d+)/healthz", healthcheck)] == [port]


def test_the_worker_image_installs_torch_from_a_wheel_index_then_the_worker_extra():
    runs = [text for i, text in dockerfile_instructions(DOCKERFILES["worker"]) if i == "RUN"]
    torch = next(n for n, text in enumerate(runs) if "--index-url" in text and "torch" in text)
    extra = next(n for n, text in enumerate(runs) if '".[worker]"' in text)
    assert torch < extra
    api_runs = [text for i, text in dockerfile_instructions(DOCKERFILES["api"]) if i == "RUN"]
    assert not any("torch" in text or "[worker]" in text for text in api_runs), "the API image has no torch"


def test_the_build_context_keeps_what_the_images_copy():
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "common/", "producer/", "worker/"):
        assert f"!{needed}" in ignored
