"""Every benchmark in bench/ runs as docs/benchmarks.md says, on a fresh clone and offline.

Each script runs once with its smallest arguments (a few jobs, a tiny model, one repeat): it
must exit 0 and end with its JSON line. The figures of such runs mean nothing and are not
checked. The GPU scripts need a GPU (gpu_check.sh) or the network (gpu_wheels.sh): their
syntax is checked here, and docs/benchmarks.md gives gpu_check.sh's CPU smoke run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCH = REPO / "bench"
DOCS = (REPO / "docs" / "benchmarks.md").read_text()

SMOKE = {
    "affinity.py": ["--jobs", "8"],
    "batch_determinism.py": ["--families", "sd15", "flux1", "--max-rows", "3", "--steps", "1"],
    "checkpoint_load.py": ["--shape", "tiny", "--repeats", "1"],
    "dashboard_load.py": ["--records", "200", "--queued", "50", "--repeats", "2"],
    "lora_bytes.py": [],  # shapes only (meta device): it is this fast whole
    "lora_modes.py": ["--families", "sd15", "--steps", "1"],
    "lora_switch.py": ["--shape", "tiny", "--repeats", "1", "--changes", "20"],
    "mixed_stacks.py": ["--jobs", "8", "--ns", "2", "--dist", "uniform", "--steps", "1"],
    "queue_overhead.py": ["--jobs", "20"],
    "throughput.py": ["--seeds", "2"],  # two seeds: one LCM and one standard job per stack
}
"""Each Python bench and its smoke arguments."""

RUNS = [
    *SMOKE.items(),
    ("lora_switch.py", ["--family", "flux1", "--shape", "tiny", "--repeats", "1", "--changes", "20"]),
]
"""Every smoke run: each bench's, and the FLUX.1 side of the LoRA switch bench too."""

SHELL = ("gpu_check.sh", "gpu_wheels.sh")


def test_every_bench_has_a_smoke_run_and_rerun_instructions():
    # bench/_name.py: a part of a bench (a family's side), not a bench
    assert sorted(p.name for p in BENCH.glob("[!_]*.py")) == sorted(SMOKE)
    assert sorted(p.name for p in BENCH.glob("*.sh")) == sorted(SHELL)
    undocumented = [name for name in [*SMOKE, *SHELL] if f"bench/{name}" not in DOCS]
    assert undocumented == [], "docs/benchmarks.md says how to rerun every bench"


@pytest.mark.slow
@pytest.mark.parametrize("script, args", RUNS, ids=[" ".join([script, *args[:2]]) for script, args in RUNS])
def test_a_bench_runs_offline_and_prints_its_json_line(script, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env |= {
        "TMPDIR": str(tmp_path),  # the benches' temporary homes, kept with the test's
        "HF_HUB_OFFLINE": "1",  # a bench that reached for a model hub would fail
        "OMP_NUM_THREADS": "1",  # torch on cores other tests share: one thread is many times faster
    }
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["bench"] == script.removesuffix(".py")


@pytest.mark.parametrize("script", SHELL)
def test_a_gpu_script_parses(script):
    result = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
