"""The deploy files agree with the code, and the Kubernetes manifests are valid.

Fast and offline: the compose files are read as YAML, the kustomize overlays are built with
``kubectl kustomize`` (required: the test fails without kubectl) and every manifest is checked
against the Kubernetes schemas that the kubernetes-validate package ships. KEDA's resources
are not in those schemas, so their fields are checked here by hand.

Drift checks: every ``lorafleet ...`` command line in an image, a compose file, a manifest or
docs/deploy.md parses with the real CLI; every LORAFLEET_* variable is a Settings field; the
API's port is the one ``serve`` listens on everywhere it is named; each KEDA trigger reads one
of the Celery priority lists of its worker's queue; a stopping worker is given longer than the
visibility timeout to finish its job.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import typer.main
import yaml

from lorafleet.common.schema import keys
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


# --- Dockerfiles ---------------------------------------------------------------------------


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


# --- docker compose ------------------------------------------------------------------------


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


# --- Kubernetes ----------------------------------------------------------------------------


@functools.cache
def kustomize(folder: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH: the Kubernetes manifests cannot be built "
            "(install kubectl 1.27 or newer; it bundles kustomize)",
            pytrace=False,
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_specs(docs) -> dict[str, dict]:
    """Pod specs of the workloads, by workload name."""
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    }


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(docs, container: dict) -> dict[str, str | None]:
    """The container's environment: envFrom ConfigMaps, then env (None where from a Secret)."""
    configmaps = of_kind(docs, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in configmaps, f"envFrom names ConfigMap {name}, which is not in the build"
            env.update(configmaps[name]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def container_commands(container: dict) -> list[list[str]]:
    commands = [[*container.get("command", []), *container.get("args", [])]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "exec" in container.get(probe, {}):
            commands.append(container[probe]["exec"]["command"])
    return commands


def lorafleet_containers(docs, subcommand: str) -> list[tuple[str, dict, list[str]]]:
    """(workload, container, arguments) for each container running ``lorafleet SUBCOMMAND``."""
    found = []
    for workload, spec in pod_specs(docs).items():
        for container in spec["containers"]:
            calls = lorafleet_calls(container_commands(container)[0])
            if calls and calls[0] and calls[0][0] == subcommand:
                found.append((workload, container, calls[0]))
    return found


def is_keda(doc: dict) -> bool:
    return doc["apiVersion"].split("/")[0] == "keda.sh"


KEDA_SCALED_OBJECT_FIELDS = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
KEDA_TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
KEDA_REDIS_METADATA = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "usernameFromEnv",
    "passwordFromEnv",
}
KEDA_AUTH_PARAMETERS = {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key"}


def check_keda(doc: dict) -> None:
    """What KEDA's CRDs require of the fields used here (their schemas are not in kubernetes-validate)."""
    what = f"{doc['kind']}/{doc['metadata']['name']}"
    assert doc["apiVersion"] == "keda.sh/v1alpha1", what
    spec = doc["spec"]
    if doc["kind"] == "TriggerAuthentication":
        assert spec["secretTargetRef"], what
        for ref in spec["secretTargetRef"]:
            assert set(ref) == {"parameter", "name", "key"} and ref["parameter"] in KEDA_AUTH_PARAMETERS, what
        return
    assert doc["kind"] == "ScaledObject", what
    assert set(spec) <= KEDA_SCALED_OBJECT_FIELDS, (
        f"{what}: unknown fields {set(spec) - KEDA_SCALED_OBJECT_FIELDS}"
    )
    assert spec["scaleTargetRef"]["name"] and spec["triggers"], what
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], what
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior:  # KEDA passes it to the HPA as is: validate it as one
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "x"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    names = [trigger.get("name") for trigger in spec["triggers"] if trigger.get("name")]
    assert len(names) == len(set(names)), f"{what}: trigger names must be unique"
    for trigger in spec["triggers"]:
        assert set(trigger) <= KEDA_TRIGGER_FIELDS, (
            f"{what}: unknown trigger fields {set(trigger) - KEDA_TRIGGER_FIELDS}"
        )
        assert trigger["type"] == "redis", what
        meta = trigger["metadata"]
        assert set(meta) <= KEDA_REDIS_METADATA, (
            f"{what}: unknown redis metadata {set(meta) - KEDA_REDIS_METADATA}"
        )
        assert {"listName", "listLength"} <= set(meta) and (
            {"address", "addressFromEnv", "host"} & set(meta)
        ), what
        assert all(isinstance(value, str) for value in meta.values()), (
            f"{what}: trigger metadata values are strings"
        )


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_manifests_are_valid_kubernetes(folder):
    docs = kustomize(folder)
    assert docs
    for doc in docs:
        if is_keda(doc):
            check_keda(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{folder}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}"
            ) from None


def test_the_secret_example_is_a_valid_secret():
    doc = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"]["name"] == SECRET_NAME


def secret_keys(docs) -> set[str]:
    """Keys of lorafleet-secrets: the build's own Secret, else the example one creates."""
    secret = of_kind(docs, "Secret").get(SECRET_NAME)
    if secret is None:
        secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_every_secret_and_config_reference_resolves(folder):
    docs = kustomize(folder)
    keys = secret_keys(docs)
    for workload, spec in pod_specs(docs).items():
        for container in all_containers(spec):
            container_env(docs, container)  # every envFrom ConfigMap exists
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] == SECRET_NAME and ref["key"] in keys, (
                        f"{workload}: {var['name']}: {ref}"
                    )
            # $(VAR) expands only variables defined before it (envFrom, then env in order).
            defined = set(container_env(docs, {"envFrom": container.get("envFrom", [])}))
            for var in container.get("env", []):
                for name in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                    assert name in defined, f"{workload}: {var['name']} uses $({name}) before it is defined"
                defined.add(var["name"])
            for word in [*container.get("command", []), *container.get("args", [])]:
                for name in re.findall(r"\$\((\w+)\)", word):
                    assert name in defined, f"{workload}: its command uses $({name}), which is not defined"
    for auth in of_kind(docs, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET_NAME and ref["key"] in keys, ref


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_manifest_commands_are_real_lorafleet_commands(folder):
    docs = kustomize(folder)
    calls = 0
    for workload, spec in pod_specs(docs).items():
        for container in all_containers(spec):
            for command in container_commands(container):
                calls += check_lorafleet_calls(command, f"{folder}: {workload}/{container['name']}")
    assert calls


def test_only_lorafleet_settings_are_named_lorafleet_everywhere():
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DEPLOY_DOC, REPO / ".dockerignore"]
    for path in files:
        named = set(re.findall(r"LORAFLEET_[A-Z0-9_]+", path.read_text()))
        assert named - SETTINGS == set(), f"{path.relative_to(REPO)} names settings that do not exist"


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_the_api_listens_where_its_service_probes_and_ingress_point(folder):
    docs = kustomize(folder)
    apis = lorafleet_containers(docs, "serve")
    assert len(apis) == 1
    workload, container, args = apis[0]
    env = container_env(docs, container)
    serve = CLI.commands["serve"].make_context("serve", args[1:]).params
    port = serve["port"] or int(env.get("LORAFLEET_API_PORT") or API_PORT)
    assert (serve["host"] or env.get("LORAFLEET_API_HOST")) == "0.0.0.0"
    assert any(var["name"] == "LORAFLEET_API_TOKENS" for var in container["env"]), "serve needs tokens"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(named.values()) == {port}

    def resolve(value):
        return named[value] if isinstance(value, str) else value

    for probe in ("readinessProbe", "livenessProbe"):
        action = container[probe].get("httpGet") or container[probe].get("tcpSocket")
        assert resolve(action["port"]) == port, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    labels = of_kind(docs, "Deployment")[workload]["spec"]["template"]["metadata"]["labels"]
    services = {
        name: s
        for name, s in of_kind(docs, "Service").items()
        if s["spec"]["selector"].items() <= labels.items()
    }
    assert services, "no Service selects the API's pods"
    for service in services.values():
        assert {resolve(p["targetPort"]) for p in service["spec"]["ports"]} == {port}
    for ingress in of_kind(docs, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services
                ports = services[backend["name"]]["spec"]["ports"]
                assert any(
                    backend["port"].get("name") == p.get("name") or backend["port"].get("number") == p["port"]
                    for p in ports
                )


def worker_models(args: list[str]) -> list[str]:
    models = CLI.commands["worker"].make_context("worker", args[1:]).params["models"]
    return [m.strip() for m in models.split(",") if m.strip()]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_workers_drain_longer_than_the_visibility_timeout_and_probe_their_heartbeat(folder):
    docs = kustomize(folder)
    workers = lorafleet_containers(docs, "worker")
    assert workers
    for workload, container, _ in workers:
        spec = pod_specs(docs)[workload]
        timeout = int(
            container_env(docs, container).get("LORAFLEET_VISIBILITY_TIMEOUT") or VISIBILITY_TIMEOUT
        )
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > timeout, (
            f"{workload}: terminationGracePeriodSeconds {grace} <= visibility timeout {timeout}"
        )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            calls = lorafleet_calls(container[probe]["exec"]["command"])
            assert [parse_lorafleet(call) for call in calls] == ["workers check"], f"{workload}: {probe}"


def test_production_workers_each_get_a_gpu_and_a_scaler():
    docs = kustomize("overlays/production")
    workers = lorafleet_containers(docs, "worker")
    assert len(workers) >= 2, "one worker Deployment per base model"
    scaled = {so["spec"]["scaleTargetRef"]["name"] for so in of_kind(docs, "ScaledObject").values()}
    for workload, container, _ in workers:
        for side in ("requests", "limits"):
            assert str(container["resources"][side].get("nvidia.com/gpu")) == "1", f"{workload}: {side}"
        assert workload in scaled, f"{workload}: no ScaledObject scales it"


def test_the_cpu_demo_asks_for_no_gpu():
    docs = kustomize("overlays/cpu-demo")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert not [doc for doc in docs if is_keda(doc)], "the demo runs without KEDA"
    for workload, container, args in lorafleet_containers(docs, "worker"):
        assert container_env(docs, container)["LORAFLEET_DEVICE"] == "cpu"
        home = Path(container_env(docs, container)["LORAFLEET_HOME"])
        made = [
            call
            for c in all_containers(pod_specs(docs)[workload])
            for command in container_commands(c)
            for call in lorafleet_calls(command)
            if call[0] == "make-tiny-model"
        ]
        for model in worker_models(args):
            assert [home / "models" / model] == [Path(call[1]) for call in made], f"nothing makes {model}"


def test_the_redis_address_is_fully_qualified_in_its_namespace():
    for folder in ("overlays/production", "overlays/cpu-demo"):
        docs = kustomize(folder)
        redis = of_kind(docs, "Service")["lorafleet-redis"]
        addresses = [
            cm["data"]["REDIS_ADDRESS"]
            for cm in of_kind(docs, "ConfigMap").values()
            if "REDIS_ADDRESS" in cm["data"]
        ]
        assert addresses
        for address in addresses:
            host, port = address.rsplit(":", 1)
            assert host == f"lorafleet-redis.{redis['metadata']['namespace']}.svc.cluster.local", folder
            assert int(port) in {p["port"] for p in redis["spec"]["ports"]}


@pytest.mark.parametrize("folder", ["base", "overlays/production"])
def test_each_scaled_object_reads_the_priority_lists_of_its_workers_queue(folder):
    docs = kustomize(folder)
    deployments = of_kind(docs, "Deployment")
    auths = of_kind(docs, "TriggerAuthentication")
    workers = {
        workload: (container, args) for workload, container, args in lorafleet_containers(docs, "worker")
    }
    scaled_objects = of_kind(docs, "ScaledObject")
    assert scaled_objects
    for name, so in scaled_objects.items():
        spec = so["spec"]
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in deployments, name
        assert target["name"] in workers, f"{name} scales {target['name']}, which runs no lorafleet worker"
        assert "replicas" not in deployments[target["name"]]["spec"], "KEDA owns the replica count"
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
        container, args = workers[target["name"]]
        expected = {key for model in worker_models(args) for key in keys.priority_lists(keys.queue(model))}
        env = container_env(docs, container)
        listed = []
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis", "KEDA's redis scaler reads Celery's lists"
            meta = trigger["metadata"]
            assert meta["listName"] in expected, (
                f"{name}: {meta['listName']!r} is not a list of the worker's queue"
            )
            listed.append(meta["listName"])
            assert int(meta["listLength"]) > 0
            assert meta["addressFromEnv"] in env, (
                f"{name}: {meta['addressFromEnv']} is not in the worker's env"
            )
            broker = urlparse(env["LORAFLEET_BROKER_URL"].replace("$(REDIS_ADDRESS)", env["REDIS_ADDRESS"]))
            assert f"{broker.hostname}:{broker.port}" == env[meta["addressFromEnv"]], (
                "KEDA reads another Redis"
            )
            assert meta.get("databaseIndex", "0") == (broker.path.strip("/") or "0")
            auth = auths[trigger["authenticationRef"]["name"]]
            assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"password"}
        assert sorted(listed) == sorted(expected), f"{name}: one trigger per priority list"


def test_the_trigger_authentication_reads_the_password_redis_uses():
    docs = kustomize("overlays/production")
    redis = pod_specs(docs)["lorafleet-redis"]["containers"][0]
    password = next(var for var in redis["env"] if var["name"] == "REDIS_PASSWORD")["valueFrom"][
        "secretKeyRef"
    ]
    assert "$(REDIS_PASSWORD)" in redis["args"]
    for auth in of_kind(docs, "TriggerAuthentication").values():
        (ref,) = auth["spec"]["secretTargetRef"]
        assert (ref["name"], ref["key"]) == (password["name"], password["key"])


# --- the guide -----------------------------------------------------------------------------


def test_the_deploy_guide_commands_are_real_and_the_readme_links_it():
    text = DEPLOY_DOC.read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, flags=re.S)
    assert blocks
    checked = 0
    for block in blocks:
        script = re.sub(r"\\\n", " ", block)
        for line in script.splitlines():
            words = _shell_words(line.split(" #", 1)[0]) if line.strip() and not line.startswith("#") else []
            for n, word in enumerate(words):
                if word != "lorafleet" or (n and words[n - 1].startswith("-") and words[n - 1] != "--"):
                    continue
                call = []
                for rest in words[n + 1 :]:
                    if _SHELL_OPERATORS.match(rest):
                        break
                    call.append(rest)
                if call and not call[0].startswith("-") and call[0] in CLI.commands:
                    try:
                        parse_lorafleet(call)
                    except AssertionError as exc:  # a file on the reader's machine is fine
                        if "does not exist" not in str(exc):
                            raise
                    checked += 1
    assert checked >= 5
    assert "docs/deploy.md" in (REPO / "README.md").read_text()


def test_flower_in_kubernetes_keeps_its_secrets_off_the_command_line():

    documents = yaml.safe_load_all((DEPLOY / "k8s/base/core/flower.yaml").read_text())
    [deployment] = [d for d in documents if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert not any(arg.startswith(("--broker", "--basic-auth")) for arg in container["command"])
    names = {env["name"] for env in container["env"]}
    assert {"CELERY_BROKER_URL", "FLOWER_BASIC_AUTH"} <= names


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
