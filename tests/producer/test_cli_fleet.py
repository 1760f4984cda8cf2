"""`lorafleet workers list|check` and `lorafleet queues` against a real Redis, as a probe runs them."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from lorafleet.common.fleet.workers import WorkerBeat, WorkerRegistry
from lorafleet.common.schema.errors import JobRejected
from lorafleet.producer.client import Client
from tests.helpers import beat_aged, lorafleet_env, run_cli

TINY = "tiny-sd15"


def beat(name: str, host: str, age: float, models=(TINY,)) -> WorkerBeat:
    now = time.time()
    return WorkerBeat(
        name=name,
        host=host,
        pid=1,
        version="test",
        device="cpu",
        models=list(models),
        queues=[f"lorafleet.model.{m}" for m in models],
        started_at=now - 100,
        last_seen=now - age,
    )


@pytest.mark.slow
def test_workers_check_passes_only_for_an_alive_heartbeat(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    registry = WorkerRegistry(Client(settings).redis)

    missing = run_cli(["workers", "check"], env)
    assert missing.returncode == 1 and "no heartbeat at all" in missing.stderr

    beat_aged(registry, beat("w1@here", socket.gethostname(), age=1))
    assert run_cli(["workers", "check"], env).returncode == 0
    assert run_cli(["workers", "check", "--name", "w1@here"], env).returncode == 0

    beat_aged(registry, beat("w2@there", "there", age=30))
    stale = run_cli(["workers", "check", "--host", "there"], env)
    assert stale.returncode == 1 and re.search(r"last beat 3[0-9] s ago", stale.stderr)

    listed = {w["name"]: w for w in json.loads(run_cli(["workers", "list", "--json"], env).stdout)}
    assert listed["w1@here"]["liveness"] == "alive" and listed["w2@there"]["liveness"] == "stale"


@pytest.mark.slow
def test_queues_counts_waiting_jobs_by_priority_and_names_live_workers(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    with Client(settings) as client:
        for priority in ("high", "low", "low"):
            client.submit({"model": TINY, "prompt": "waiting", "priority": priority})
        beat_aged(WorkerRegistry(client.redis), beat("w1@here", "here", age=1))
    rows = {row["model"]: row for row in json.loads(run_cli(["queues", "--json"], env).stdout)}
    assert (
        rows[TINY]["depth"] == 3
        and rows[TINY]["by_priority"]["0"] == 1
        and rows[TINY]["by_priority"]["6"] == 2
    )
    assert rows[TINY]["workers"] == ["w1@here"] and rows["tiny-sdxl"]["workers"] == []
    table = run_cli(["queues"], env).stdout
    assert "tiny-sdxl" in table and "none" in table


@pytest.mark.slow
def test_submit_warns_when_no_worker_serves_the_model_and_require_worker_refuses(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    warned = run_cli(["submit", "--model", TINY, "--prompt", "x"], env)
    assert warned.returncode == 0 and "warning: no live worker serves 'tiny-sd15'" in " ".join(
        warned.stderr.split()
    )
    refused = run_cli(["submit", "--model", TINY, "--prompt", "x", "--require-worker"], env)
    assert refused.returncode == 2
    assert "refused: model: no live worker serves 'tiny-sd15'" in " ".join(refused.stderr.split())
    rows = {row["model"]: row for row in json.loads(run_cli(["queues", "--json"], env).stdout)}
    assert rows[TINY]["depth"] == 1  # the warned job only


@pytest.mark.slow
def test_models_add_registers_a_name_every_machine_resolves(settings, home, redis_url, tmp_path):
    import shutil

    folder = tmp_path / "pipelines" / "house"
    shutil.copytree(home / "models" / TINY, folder)
    env = lorafleet_env(home, redis_url)
    added = run_cli(["models", "add", "house-style", str(folder)], env)
    assert added.returncode == 0 and "registered house-style" in added.stdout and "(sd15)" in added.stdout
    hub = run_cli(["models", "add", "hubby", "acme/sdxl-thing", "--family", "sdxl"], env)
    assert hub.returncode == 0
    bad = run_cli(["models", "add", "../up", str(folder)], env)
    assert bad.returncode == 2 and "NAME" in bad.stderr
    rows = {r["name"]: r for r in json.loads(run_cli(["models", "list", "--json"], env).stdout)}
    assert rows["house-style"]["where"] == "shared" and rows["house-style"]["source"] == str(folder)
    assert rows["hubby"]["family"] == "sdxl" and rows[TINY]["where"] == "local"
    # Another machine (no such folder under its models/) resolves the name through Redis.
    with Client(settings) as client:
        handle = client.submit(
            {"model": "house-style", "prompt": "registered", "loras": [{"name": "watercolor"}]}
        )
        assert handle.queue == "lorafleet.model.house-style" and handle.job.width == 64
        with pytest.raises(JobRejected, match="is for sd15 but model 'hubby' is sdxl"):
            client.submit({"model": "hubby", "prompt": "x", "loras": [{"name": "watercolor"}]})
    assert run_cli(["models", "remove", "hubby"], env).returncode == 0
    assert run_cli(["models", "remove", "hubby"], env).returncode == 1


@pytest.mark.slow
def test_models_add_detects_the_family_of_each_flow_folder(home, redis_url, tmp_path):
    from lorafleet.worker.tiny import make_tiny_model

    env = lorafleet_env(home, redis_url)
    families = {"flux1": "flux1", "flux1-schnell": "flux1", "zimage": "zimage", "qwenimage": "qwenimage"}
    families["flux2"] = "flux2"
    for tiny, family in families.items():
        folder = make_tiny_model(tmp_path / "downloads" / tiny, family=tiny)
        added = run_cli(["models", "add", f"my-{tiny}", str(folder)], env)
        assert added.returncode == 0 and f"({family})" in added.stdout, added.stderr
    rows = {r["name"]: r for r in json.loads(run_cli(["models", "list", "--json"], env).stdout)}
    for tiny, family in families.items():
        assert rows[f"my-{tiny}"]["family"] == family and rows[f"my-{tiny}"]["where"] == "shared"
    # FLUX.1 dev reads a distilled guidance; schnell is step-distilled without one
    assert rows["my-flux1"]["guidance_embeds"] is True and rows["my-flux1-schnell"]["distilled"] is True
    assert rows["my-flux1"]["distilled"] is False and rows["my-flux1-schnell"]["guidance_embeds"] is False
    assert all(rows[f"my-{tiny}"]["transformer_width"] for tiny in families)


@pytest.mark.slow
def test_models_add_takes_a_checkpoint_with_its_config_and_refuses_a_refiner(
    settings, home, redis_url, tmp_path
):
    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.worker.checkpoint_format import write_single_file
    from tests.common.test_checkpoints import shapes_of, write_header_only

    checkpoint = write_single_file(
        home / "models" / TINY, tmp_path / "civitai" / "tiny_v1.safetensors", "sd15"
    )
    env = lorafleet_env(home, redis_url)
    added = run_cli(
        ["models", "add", "civitai-tiny", str(checkpoint), "--config", str(home / "models" / TINY)], env
    )
    assert added.returncode == 0 and "(sd15)" in added.stdout, added.stderr
    model = ModelRegistry(settings, Client(settings).redis).get("civitai-tiny")
    assert model.single_file and model.config == str(home / "models" / TINY) and model.native_size == 64
    refiner = tmp_path / "refiner.safetensors"
    write_header_only(refiner, shapes_of("refiner"))
    refused = run_cli(["models", "add", "refiner", str(refiner)], env)
    assert refused.returncode == 2 and "refiner.safetensors: an SDXL refiner" in refused.stderr
    rows = {r["name"] for r in json.loads(run_cli(["models", "list", "--json"], env).stdout)}
    assert "civitai-tiny" in rows and "refiner" not in rows
