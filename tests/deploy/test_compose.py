"""The docker compose files (deploy/compose.yaml, deploy/compose.cpu.yaml) agree with the code.

Fast and offline: the compose files are read as YAML, with compose's interpolation and its merge
of an override file done here. Every ``lorafleet ...`` command line parses with the real CLI; every
variable is in deploy/.env.example; the API listens on its port with tokens; a stopping worker is
given longer than the visibility timeout to finish its job; GPU workers reserve a GPU and the CPU
override runs on the tiny model it makes; Redis refuses writes before its container (in compose
and in Kubernetes) is killed for memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import (
    API_PORT,
    COMPOSE,
    COMPOSE_CPU,
    DEPLOY,
    ENV_EXAMPLE,
    VISIBILITY_TIMEOUT,
    check_lorafleet_calls,
    lorafleet_calls,
    parse_lorafleet,
    worker_models,
)


class _Reset:
    """Compose's ``!reset`` tag: the override removes the key."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_object(node, deep=True))


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR:?message} and $$."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        assert not (op or "").endswith("?"), f"${{{name}}} is required: {arg}"
        return arg if op and op.endswith("-") else ""

    return _VARIABLE.sub(replace, text)


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict:
    text = interpolate(path.read_text(), env_example() if env is None else env)
    return yaml.load(text, Loader=ComposeLoader)


def _volume_target(volume) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def _merge(base, override, key: str = ""):
    """Compose's merge of an override file, as far as these files need it."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(name, None)
            else:
                merged[name] = _merge(base[name], value, name) if name in base else value
        return merged
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {_volume_target(v): v for v in base} | {_volume_target(v): v for v in override}
        return list(by_target.values())
    return override


def compose_stack(*paths: Path) -> dict:
    stack: dict = {}
    for path in paths:
        stack = _merge(stack, load_compose(path))
    return stack


def running_services(stack: dict) -> dict[str, dict]:
    """Services that `up` starts without a --profile."""
    return {name: s for name, s in stack["services"].items() if not s.get("profiles")}


def _argv(value) -> list[str] | str:
    return [str(word) for word in value] if isinstance(value, list) else value


def service_commands(service: dict) -> list[list[str] | str]:
    commands = []
    entrypoint = _argv(service.get("entrypoint") or [])
    command = _argv(service.get("command") or [])
    if entrypoint and Path(entrypoint[0]).name in ("sh", "bash") and isinstance(command, list):
        commands.append([*entrypoint, *command])
    elif command:
        commands.append(command)
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"):
        commands.append(test[1:] if test[0] == "CMD" else test[1])
    return commands


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def lorafleet_services(stack: dict, subcommand: str) -> dict[str, list[str]]:
    """Services whose command is ``lorafleet SUBCOMMAND ...``, with its arguments."""
    found = {}
    for name, service in stack["services"].items():
        command = _argv(service.get("command") or [])
        calls = lorafleet_calls(command) if command else []
        if calls and calls[-1] and calls[-1][0] == subcommand:
            found[name] = calls[-1]
    return found


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a compose duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_every_compose_variable_is_in_the_env_example_and_every_example_is_used():
    used = set()
    for path in (COMPOSE, COMPOSE_CPU):
        used |= {m.group("name") for m in _VARIABLE.finditer(path.read_text()) if m.group("name")}
    example = set(env_example())
    assert used - example == set(), "deploy/.env.example does not document these"
    assert example - used == set(), "deploy/.env.example sets variables no compose file uses"
    assert not any(name.startswith("LORAFLEET_") for name in example), (
        "the .env only feeds compose.yaml; lorafleet's settings are set in compose.yaml itself"
    )
    with pytest.raises(AssertionError, match="is required"):
        load_compose(COMPOSE, env={})


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_commands_are_real_lorafleet_commands(files):
    stack = compose_stack(*files)
    for name, service in stack["services"].items():
        for command in service_commands(service):
            check_lorafleet_calls(command, f"service {name}")
    assert set(lorafleet_services(stack, "serve")) == {"api"}


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_serves_the_api_on_its_port_with_tokens(files):
    stack = compose_stack(*files)
    api = stack["services"]["api"]
    env = service_env(api)
    port = int(env.get("LORAFLEET_API_PORT", API_PORT))
    assert env["LORAFLEET_API_HOST"] == "0.0.0.0"
    assert env["LORAFLEET_API_TOKENS"], "without tokens serve listens on 127.0.0.1 only"
    assert {int(str(mapping).rsplit(":", 1)[1]) for mapping in api["ports"]} == {port}
    assert [int(p) for p in re.findall(r":(\d+)/healthz", " ".join(api["healthcheck"]["test"]))] == [port]


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
def test_compose_workers_drain_and_report_health(files):
    stack = compose_stack(*files)
    workers = lorafleet_services(stack, "worker")
    assert workers
    for name in workers:
        service = stack["services"][name]
        timeout = int(service_env(service).get("LORAFLEET_VISIBILITY_TIMEOUT", VISIBILITY_TIMEOUT))
        grace = duration_seconds(service.get("stop_grace_period", "10s"))
        assert grace > timeout, (
            f"{name}: stop_grace_period {grace} s must exceed the visibility timeout {timeout} s"
        )
        checks = [lorafleet_calls(c) for c in service_commands(service)[1:]]
        assert [parse_lorafleet(call) for calls in checks for call in calls] == ["workers check"], name


def test_every_gpu_worker_reserves_an_nvidia_gpu():
    stack = compose_stack(COMPOSE)
    workers = lorafleet_services(stack, "worker")
    assert len(workers) >= 2, "one worker service per base model"
    served = [tuple(worker_models(args)) for args in workers.values()]
    assert len(set(served)) == len(served), "two services serve the same models"
    for name in workers:
        devices = stack["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name


def test_the_cpu_override_runs_cpu_workers_on_the_tiny_model_it_makes():
    stack = compose_stack(COMPOSE, COMPOSE_CPU)
    running = running_services(stack)
    workers = {name: args for name, args in lorafleet_services(stack, "worker").items() if name in running}
    assert workers
    made = {}
    for service in running.values():
        for command in service_commands(service):
            for call in lorafleet_calls(command):
                if call[0] == "make-tiny-model":
                    made[Path(call[1]).name] = Path(call[1]).parent
    for name, args in workers.items():
        service = running[name]
        assert "deploy" not in service, f"{name}: a GPU reservation fails on a machine without one"
        assert service_env(service).get("LORAFLEET_DEVICE") == "cpu"
        home = Path(service_env(service)["LORAFLEET_HOME"])
        for model in worker_models(args):
            assert made.get(model) == home / "models", f"{name} serves {model}, which nothing makes"


def test_compose_flower_watches_the_broker_lorafleet_uses():
    stack = compose_stack(COMPOSE)
    flower = stack["services"]["flower"]
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    env = service_env(flower)
    assert env["CELERY_BROKER_URL"] == service_env(stack["services"]["api"])["LORAFLEET_BROKER_URL"]
    assert env["FLOWER_BASIC_AUTH"].startswith("ops:")
    # no secret on a command line, which every process on the host can read
    assert not any(arg.startswith(("--broker", "--basic-auth")) for arg in command)


def _megabytes(value: str) -> float:
    number, unit = re.match(r"^(\d+(?:\.\d+)?)\s*([a-zA-Z]*)$", str(value)).groups()
    return (
        float(number)
        * {"": 1 / 2**20, "mb": 1, "m": 1, "mi": 1, "gb": 1024, "g": 1024, "gi": 1024}[unit.lower()]
    )


def test_redis_refuses_writes_before_its_container_is_killed():
    stack = compose_stack(COMPOSE)
    command = stack["services"]["redis"]["command"]
    maxmemory = _megabytes(command[command.index("--maxmemory") + 1])
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert maxmemory < _megabytes(stack["services"]["redis"]["mem_limit"])
    documents = yaml.safe_load_all((DEPLOY / "k8s/base/core/redis.yaml").read_text())
    [redis] = [d for d in documents if d and d["kind"] in ("Deployment", "StatefulSet")]
    [container] = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert _megabytes(args[args.index("--maxmemory") + 1]) < _megabytes(
        container["resources"]["limits"]["memory"]
    )
