"""What lorafleet's path costs per job beyond Celery's own round trip, on the same Redis.

Three runs, one after the other, each with one worker process (solo pool, prefetch 1,
acks_late, task events on: lorafleet's Celery configuration) and the same Redis:

- bare Celery: ``send_task`` of N no-op tasks; each task only counts itself;
- the floor: the same, and each task also makes the two atomic record writes a job's
  lifecycle needs at least (its start and its end, fleet/lifecycle.py), each the barest
  such step: one server-side script that compares a record-sized value and replaces it. What
  any design with an atomic start and end costs on this Redis before it does its own work;
- lorafleet: ``Client.submit_many`` of N jobs (validation, resolution, records, grouping,
  sending), and a worker whose runner does all its record keeping (record read, start
  transaction, final record, metrics) but replaces pipeline, LoRA and sampling work with
  nothing and stores no image.

The jobs name a tiny pipeline folder built offline in the bench's temporary home (as a user's
``models/<name>`` would be); it is resolved at submit, never loaded. Nothing is downloaded.

Each run's time goes from the first send to the last job ended. Prints each, per job and per
second, their ratios to bare Celery (target: lorafleet within 1.3x) and lorafleet's jobs per
second through one worker (target: at least 300 on the 2-core development machine), then one
JSON line. Never part of the test run.

    .venv/bin/python bench/queue_overhead.py            # 2,000 jobs each
    .venv/bin/python bench/queue_overhead.py --jobs 5000
    .venv/bin/python bench/queue_overhead.py --jobs 20      # a smoke run (tests/test_benches.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.common.fleet.queue import make_celery, worker_argv
from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.schema import keys
from lorafleet.common.schema.settings import Settings

MODEL = "noop-model"  # a tiny pipeline folder under the home's models/: resolved, never loaded
COUNTER = "bench:bare:done"
RECORD = "bench:floor:record"
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
"""The barest atomic record change: compare with what the writer believes, then replace."""
BATCH = 500


def app_for(settings: Settings):
    from lorafleet.common.infra.broker import resolve_broker

    return make_celery(settings, resolve_broker(settings))


def serve(kind: str, settings: Settings) -> None:
    """The worker process: bare Celery, the floor, or lorafleet's runner with the GPU work left out."""
    from lorafleet.common.fleet.store import JobStore
    from lorafleet.common.infra.broker import resolve_broker
    from lorafleet.common.schema.jobs import JobRecord, JobStatus, Progress

    app = app_for(settings)
    redis = resolve_broker(settings).client()
    if kind == "bare":

        @app.task(name="bench.noop", acks_late=True, ignore_result=True)
        def noop() -> None:
            redis.incr(COUNTER)

    elif kind == "floor":
        swap = redis.register_script(_SWAP)
        queued, running = "q" * 1100, "r" * 1100  # a record's size as stored (~1.1 KB)
        redis.set(RECORD, queued)

        @app.task(name="bench.noop", acks_late=True, ignore_result=True)
        def two_steps() -> None:
            assert swap(keys=[RECORD], args=[queued, running]) == 1  # the start
            assert swap(keys=[RECORD], args=[running, queued]) == 1  # the end
            redis.incr(COUNTER)

    else:
        from lorafleet.common.infra.storage import open_storage
        from lorafleet.worker.run.runner import JobRunner
        from lorafleet.worker.tasks import register_tasks

        class NoWorkRunner(JobRunner):
            """Every record write of a real job; no pipeline, no LoRA, no sampling, no image."""

            def execute(self, record: JobRecord) -> JobStatus:
                total = record.progress.total
                self.finish(record.job_id, JobStatus.succeeded, progress=Progress(step=total, total=total))
                self.stats.done += 1
                return JobStatus.succeeded

        from lorafleet.common.catalog.loras import LoraCatalog
        from lorafleet.worker.lora.files import LoraFiles
        from lorafleet.worker.lora.store import LoraStore
        from lorafleet.worker.pipelines import PipelineCache

        store = JobStore(redis, retention=settings.record_retention)
        pipelines = PipelineCache(settings)  # never asked for a pipeline here
        loras = LoraStore(LoraFiles(LoraCatalog(settings.lora_dir), None, None), pipelines.device, 0)
        runner = NoWorkRunner(
            settings, store, open_storage(settings), pipelines, loras, worker_name="bench@noop"
        )
        register_tasks(app, runner)
    app.worker_main(worker_argv("bench@noop", [keys.queue(MODEL)], "WARNING"))


def start_worker(kind: str, home: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--home", home])
    return process


def run_bare(settings: Settings, jobs: int) -> float:
    app = app_for(settings)
    from lorafleet.common.infra.broker import resolve_broker

    redis = resolve_broker(settings).client()
    redis.delete(COUNTER)
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            app.send_task("bench.noop", queue=keys.queue(MODEL), priority=3, producer=producer)
    while int(redis.get(COUNTER) or 0) < jobs:
        time.sleep(0.002)
    return time.perf_counter() - start


def run_lorafleet(settings: Settings, jobs: int) -> float:
    from lorafleet.producer import Client

    with Client(settings) as client:
        start = time.perf_counter()
        ids = []
        for chunk in range(0, jobs, BATCH):
            handles = client.submit_many(
                [
                    {"model": MODEL, "prompt": f"job {n}", "seed": n}
                    for n in range(chunk, min(jobs, chunk + BATCH))
                ]
            )
            ids += [h.job_id for h in handles]
        records = client.wait(ids, timeout=600)
        elapsed = time.perf_counter() - start
    assert all(r.status.value == "succeeded" for r in records)
    return elapsed


def measure(kind: str, home: Path, jobs: int) -> float:
    settings = Settings(home=home)
    worker = start_worker(kind, str(home))
    try:
        time.sleep(0.5)
        warm = max(20, jobs // 50)
        run = run_lorafleet if kind == "lorafleet" else run_bare
        run(settings, warm)  # the worker up and warm
        return run(settings, jobs)
    finally:
        worker.terminate()
        worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--serve", choices=("bare", "floor", "lorafleet"), help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        # one job per task, prefetch 1: the queue's own cost, no batching of waiting jobs
        serve(args.serve, Settings(home=Path(args.home), max_batch=1))
        return
    with tempfile.TemporaryDirectory(prefix="lorafleet-queue-") as home:
        settings = Settings(home=Path(home))
        from lorafleet.worker.tiny import make_tiny_model  # torch: here, not in the bare worker

        make_tiny_model(settings.models_dir / MODEL)
        try:
            bare = measure("bare", Path(home), args.jobs)
            floor = measure("floor", Path(home), args.jobs)
            fleet = measure("lorafleet", Path(home), args.jobs)
        finally:
            embedded_redis(settings).stop()
    ratio, floor_ratio = fleet / bare, floor / bare
    print(f"\n{args.jobs} jobs through one worker, the embedded Redis (unix socket), solo pool, prefetch 1\n")
    print(f"{'path':<44} {'ms/job':>8} {'jobs/s':>8}")
    print(
        f"{'bare Celery (send_task, no-op task)':<44} {bare / args.jobs * 1000:>8.2f} {args.jobs / bare:>8.0f}"
    )
    print(
        f"{'floor (bare + two atomic record writes)':<44} {floor / args.jobs * 1000:>8.2f} {args.jobs / floor:>8.0f}"
    )
    print(
        f"{'lorafleet (submit_many, records, no GPU work)':<44} {fleet / args.jobs * 1000:>8.2f} {args.jobs / fleet:>8.0f}"
    )
    print(
        f"\nlorafleet / bare Celery: {ratio:.2f}x (target <= 1.3x; the floor: {floor_ratio:.2f}x); "
        f"lorafleet {args.jobs / fleet:.0f} jobs/s (target >= 300)"
    )
    print(
        json.dumps(
            {
                "bench": "queue_overhead",
                "jobs": args.jobs,
                "bare_s": bare,
                "floor_s": floor,
                "floor_ratio": floor_ratio,
                "lorafleet_s": fleet,
                "ratio": ratio,
                "lorafleet_jobs_per_s": args.jobs / fleet,
            }
        )
    )


if __name__ == "__main__":
    main()
