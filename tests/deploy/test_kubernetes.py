"""The Kubernetes manifests (deploy/k8s) are valid and agree with the code, KEDA's included.

Fast and offline: the kustomize overlays are built with ``kubectl kustomize`` (required: the test
fails without kubectl) and every manifest is checked against the Kubernetes schemas that the
kubernetes-validate package ships. KEDA's resources are not in those schemas, so their fields are
checked here by hand.

Drift checks: every ``lorafleet ...`` command line in a manifest parses with the real CLI; every
Secret and ConfigMap reference resolves; the API's port is the one ``serve`` listens on everywhere
it is named; each KEDA trigger reads one of the Celery priority lists of its worker's queue; a
stopping worker is given longer than the visibility timeout to finish its job.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from lorafleet.common.schema import keys
from tests.deploy.manifests import (
    API_PORT,
    CLI,
    DEPLOY,
    K8S,
    K8S_VERSION,
    KUSTOMIZATIONS,
    SECRET_NAME,
    VISIBILITY_TIMEOUT,
    check_lorafleet_calls,
    lorafleet_calls,
    parse_lorafleet,
    worker_models,
)


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


def test_flower_in_kubernetes_keeps_its_secrets_off_the_command_line():

    documents = yaml.safe_load_all((DEPLOY / "k8s/base/core/flower.yaml").read_text())
    [deployment] = [d for d in documents if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert not any(arg.startswith(("--broker", "--basic-auth")) for arg in container["command"])
    names = {env["name"] for env in container["env"]}
    assert {"CELERY_BROKER_URL", "FLOWER_BASIC_AUTH"} <= names
