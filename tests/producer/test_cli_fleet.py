"""`lorafleet workers list|check` and `lorafleet queues` against a real Redis, as a probe runs them."""

from __future__ import annotations

import json
import re
import socket
import time

from lorafleet.common.workers import WorkerBeat, WorkerRegistry
from lorafleet.producer.client import Client
from tests.helpers import lorafleet_env, run_cli

TINY = "tiny-sd15"


def beat(name: str, host: str, age: float, models=(TINY,)) -> WorkerBeat:
    now = time.time()
    return WorkerBeat(name=name, host=host, pid=1, version="test", device="cpu", models=list(models),
                      queues=[f"lorafleet.model.{m}" for m in models], started_at=now - 100, last_seen=now - age)  # fmt: skip


def test_workers_check_passes_only_for_an_alive_heartbeat(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    registry = WorkerRegistry(Client(settings).redis)

    missing = run_cli(["workers", "check"], env)
    assert missing.returncode == 1 and "no heartbeat at all" in missing.stderr

    registry.beat(beat("w1@here", socket.gethostname(), age=1))
    assert run_cli(["workers", "check"], env).returncode == 0
    assert run_cli(["workers", "check", "--name", "w1@here"], env).returncode == 0

    registry.beat(beat("w2@there", "there", age=30))
    stale = run_cli(["workers", "check", "--host", "there"], env)
    assert stale.returncode == 1 and re.search(r"last beat 3[0-9] s ago", stale.stderr)

    listed = {w["name"]: w for w in json.loads(run_cli(["workers", "list", "--json"], env).stdout)}
    assert listed["w1@here"]["liveness"] == "alive" and listed["w2@there"]["liveness"] == "stale"


def test_queues_counts_waiting_jobs_by_priority_and_names_live_workers(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    with Client(settings) as client:
        for priority in ("high", "low", "low"):
            client.submit({"model": TINY, "prompt": "waiting", "priority": priority})
        WorkerRegistry(client.redis).beat(beat("w1@here", "here", age=1))
    rows = {row["model"]: row for row in json.loads(run_cli(["queues", "--json"], env).stdout)}
    assert rows[TINY]["depth"] == 3 and rows[TINY]["by_priority"]["0"] == 1 and rows[TINY]["by_priority"]["6"] == 2
    assert rows[TINY]["workers"] == ["w1@here"] and rows["tiny-sdxl"]["workers"] == []
    table = run_cli(["queues"], env).stdout
    assert "tiny-sdxl" in table and "none" in table


def test_submit_warns_when_no_worker_serves_the_model_and_require_worker_refuses(settings, home, redis_url):
    env = lorafleet_env(home, redis_url)
    warned = run_cli(["submit", "--model", TINY, "--prompt", "x"], env)
    assert warned.returncode == 0 and "warning: no live worker serves 'tiny-sd15'" in " ".join(warned.stderr.split())
    refused = run_cli(["submit", "--model", TINY, "--prompt", "x", "--require-worker"], env)
    assert refused.returncode == 2
    assert "refused: model: no live worker serves 'tiny-sd15'" in " ".join(refused.stderr.split())
    rows = {row["model"]: row for row in json.loads(run_cli(["queues", "--json"], env).stdout)}
    assert rows[TINY]["depth"] == 1  # the warned job only
