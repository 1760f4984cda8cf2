"""Base-model loads: model-affinity routing (a queue per model) against one shared queue.

4 base models (tiny offline pipelines, each a separate folder, so each load is a real
from_pretrained), 2 workers with room for 2 hot pipelines each (lorafleet's own
PipelineCache, least recently used first), 400 jobs whose models arrive in random order.

- affinity (what lorafleet does): a queue per model; worker 1 serves models 1-2, worker 2
  serves models 3-4, each taking the next job of its queues.
- one shared queue (what a plain Celery setup does): both workers take the next job of one
  FIFO queue, whatever its model, in turn.

The routing is played out here in one process (the jobs' order and the workers' turns are
the queue's); every load is a real pipeline load into the real cache, counted and timed.
No sampling runs: it costs the same under both policies. Prints loads and load seconds side
by side, the ratio (target: affinity at least 5x fewer loads), then one JSON line. Never
part of the test run.

    .venv/bin/python bench/affinity.py              # 400 jobs
    .venv/bin/python bench/affinity.py --jobs 1000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.pipelines import PipelineCache
from lorafleet.worker.tiny import make_tiny_model

MODELS = 4
WORKERS = 2
HOT = 2


def play(policy: str, jobs: list[str], settings: Settings) -> dict:
    registry = ModelRegistry(settings)
    refs = {key: registry.get(key) for key in sorted(set(jobs))}
    caches = [PipelineCache(settings, capacity=HOT) for _ in range(WORKERS)]
    load_seconds = 0.0
    if policy == "affinity":
        keys = sorted(refs)
        serves = [keys[w * HOT : (w + 1) * HOT] for w in range(WORKERS)]
        queues = {key: deque(i for i, k in enumerate(jobs) if k == key) for key in keys}
        remaining = len(jobs)
        while remaining:
            for worker, cache in enumerate(caches):
                # A worker consuming several queues takes the oldest waiting job among them.
                ready = [queues[k][0] for k in serves[worker] if queues[k]]
                if not ready:
                    continue
                job = min(ready)
                queues[jobs[job]].popleft()
                _, seconds = cache.get(refs[jobs[job]])
                load_seconds += seconds
                remaining -= 1
    else:
        shared = deque(jobs)
        worker = 0
        while shared:
            _, seconds = caches[worker].get(refs[shared.popleft()])
            load_seconds += seconds
            worker = (worker + 1) % WORKERS
    return {"loads": sum(c.loads for c in caches), "load_seconds": load_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lorafleet-affinity-") as home:
        settings = Settings(home=Path(home), device="cpu")
        first = make_tiny_model(settings.models_dir / "model-1", family="sd15")
        for n in range(2, MODELS + 1):
            shutil.copytree(first, settings.models_dir / f"model-{n}")
        jobs = [f"model-{rng.randint(1, MODELS)}" for _ in range(args.jobs)]
        started = time.perf_counter()
        affinity = play("affinity", jobs, settings)
        shared = play("shared", jobs, settings)
        elapsed = time.perf_counter() - started
    ratio = shared["loads"] / max(1, affinity["loads"])
    print(
        f"\n{args.jobs} jobs over {MODELS} models, {WORKERS} workers with room for {HOT} hot pipelines each "
        f"(tiny pipelines, CPU; {elapsed:.0f} s)\n"
    )
    print(f"{'routing':<34} {'loads':>6} {'load s':>8}")
    print(f"{'model affinity (queue per model)':<34} {affinity['loads']:>6} {affinity['load_seconds']:>8.1f}")
    print(f"{'one shared queue':<34} {shared['loads']:>6} {shared['load_seconds']:>8.1f}")
    print(f"\naffinity makes {ratio:.0f}x fewer loads (target >= 5x)")
    print(
        json.dumps(
            {
                "bench": "affinity",
                "jobs": args.jobs,
                "models": MODELS,
                "workers": WORKERS,
                "hot": HOT,
                "affinity": affinity,
                "shared": shared,
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
