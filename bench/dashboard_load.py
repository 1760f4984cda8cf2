"""The dashboard and the API under 10,000 job records: is a page of jobs and the summary fast?

A fresh embedded Redis (the real redis-server) in a temporary home is filled the way a busy
fleet leaves it: four hub models registered by name (as `lorafleet models add` does; nothing
is downloaded, no worker runs), --queued jobs submitted through the SDK (really queued, on
the four model queues with mixed priorities) and the rest written as finished records with timings and
images, as workers leave them, with their metrics counted; twelve worker heartbeats. Then
`lorafleet serve`'s app runs under uvicorn on a loopback port and each request the
dashboard makes is timed over HTTP, as a browser would see it (median and 95th percentile
of --repeats, after one warm-up).

Prints a table and one JSON line. Never part of the test run.

    .venv/bin/python bench/dashboard_load.py                  # 10,000 records
    .venv/bin/python bench/dashboard_load.py --records 50000
    .venv/bin/python bench/dashboard_load.py --records 200 --queued 50 --repeats 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import uvicorn

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.fleet.lifecycle import end_effects
from lorafleet.common.fleet.workers import WorkerBeat, WorkerRegistry
from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.schema import keys
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.jobs import (
    GenerationJob,
    ImageRef,
    JobRecord,
    JobStatus,
    Progress,
    Timings,
    utcnow,
)
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.api import create_app
from lorafleet.producer.client import Client

MODELS = ["sd15-base", "sd15-anime", "sdxl-base", "sdxl-photo"]
"""Registered names of hub models (acme/<name>), each of the family its name begins with."""
TARGET_MS = 200.0
FINAL = [JobStatus.succeeded] * 8 + [JobStatus.failed, JobStatus.cancelled]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished_record(i: int, rng: random.Random) -> JobRecord:
    """A record as a worker leaves it: timings, one image (or an error), a LoRA stack."""
    model = MODELS[i % len(MODELS)]
    job = GenerationJob(
        job_id=f"{i:032x}",
        batch_id=f"{i // 50:032x}",
        model=model,
        prompt=f"a lighthouse, variation {i}",
        loras=[{"name": "watercolor", "weight": 0.8}, {"name": "lcm-lora", "weight": 0.35}],
        sampler="lcm",
        steps=4,
        cfg_scale=1.0,
        width=512,
        height=512,
        seed=i,
    )
    status = rng.choice(FINAL)
    submitted = utcnow() - timedelta(seconds=rng.uniform(0, 3600))
    timings = Timings(
        queue_wait=rng.uniform(0, 60),
        pipeline_load=0.0,
        lora_load=0.01,
        lora_apply=0.02,
        sampling=rng.uniform(0.5, 3),
        restore=0.01,
        upload=0.05,
        lora_hits=2,
        lora_misses=0,
    )
    timings.total = sum(
        getattr(timings, p) for p in ("lora_load", "lora_apply", "sampling", "restore", "upload")
    )
    images = []
    if status is JobStatus.succeeded:
        key = f"images/{job.batch_id}/{job.job_id}/0.png"
        images = [
            ImageRef(
                uri=f"s3://fleet/{key}",
                key=key,
                size=412_345,
                sha256="ab" * 32,
                width=512,
                height=512,
                seed=i,
            )
        ]
    return JobRecord(
        job=job,
        status=status,
        queue=keys.queue(model),
        progress=Progress(step=4, total=4),
        submitted_at=submitted,
        started_at=submitted,
        finished_at=submitted,
        timings=timings,
        worker=f"gpu{i % 12}@box{i % 3}",
        attempts=1,
        images=images,
        error="CUDA out of memory" if status is JobStatus.failed else None,
    )


def fill(client: Client, records: int, queued: int, rng: random.Random) -> None:
    started = time.perf_counter()
    models = ModelRegistry(client.settings, client.redis)
    for name in MODELS:
        models.register(name, f"acme/{name}", family=Family(name.split("-")[0]))
    jobs = [
        {
            "model": MODELS[i % len(MODELS)],
            "prompt": f"queued {i}",
            "lcm": False,
            "priority": rng.choice(["high", "normal", "normal", "low"]),
        }
        for i in range(queued)
    ]
    for chunk in range(0, queued, 500):
        client.submit_many(jobs[chunk : chunk + 500])
    done = [finished_record(i, rng) for i in range(records - queued)]
    for chunk in range(0, len(done), 1000):
        client.jobs.create_many(done[chunk : chunk + 1000])
    counters = client.redis.pipeline(transaction=False)
    for record in done:  # the counters their ends would have written (fleet/lifecycle.py)
        effects = end_effects(record, time.time())
        for command, *args in effects["hincr"]:
            counters.execute_command(command, *args)
        for key, amount, ttl in effects["incr"]:
            counters.incrby(key, amount)
            counters.expire(key, ttl)
    counters.execute()
    registry = WorkerRegistry(client.redis)
    now = time.time()
    for n in range(12):
        model = MODELS[n % len(MODELS)]
        registry.beat(
            WorkerBeat(
                name=f"gpu{n}@box{n % 3}",
                host=f"box{n % 3}",
                pid=1000 + n,
                version="bench",
                device="cuda:0",
                device_memory_used=9 << 30,
                device_memory_total=80 << 30,
                models=[model],
                queues=[keys.queue(model)],
                hot_pipelines=[model],
                cached_loras=["watercolor", "lcm-lora"],
                jobs_done=700,
                lora_hits=1400,
                lora_misses=4,
                lora_hit_rate=0.997,
                switch_p50=0.012,
                started_at=now - 3600,
                last_seen=now,
            )
        )
    print(f"filled {records} records ({queued} queued) in {time.perf_counter() - started:.1f} s", flush=True)


def serve(settings: Settings) -> tuple[uvicorn.Server, str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def time_requests(http: httpx.Client, path: str, repeats: int) -> dict:
    http.get(path).raise_for_status()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = http.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    samples.sort()
    return {
        "path": path,
        "median_ms": statistics.median(samples),
        "p95_ms": samples[min(len(samples) - 1, int(0.95 * len(samples)))],
        "bytes": len(response.content),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument(
        "--queued", type=int, default=1_000, help="of the records, how many are really queued"
    )
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="lorafleet-dash-") as home:
        settings = Settings(
            home=Path(home), storage_url="s3://fleet/images", s3_endpoint_url="http://127.0.0.1:9"
        )
        client = Client(settings)
        try:
            fill(client, args.records, args.queued, rng)
            server, base = serve(settings)
            failed_batch = f"{(args.records - args.queued) // 100:032x}"
            paths = [
                "/v1/jobs?limit=50",
                "/v1/jobs?limit=50&status=succeeded",
                f"/v1/jobs?limit=50&status=failed&model={MODELS[2]}",
                "/v1/jobs?limit=50&offset=5000",
                f"/v1/batches/{failed_batch}",
                "/v1/summary",
                "/metrics",
                "/v1/workers",
                "/",
            ]
            with httpx.Client(base_url=base, timeout=30) as http:
                rows = [time_requests(http, path, args.repeats) for path in paths]
            server.should_exit = True
        finally:
            embedded_redis(client.settings).stop()
    print(f"\n{args.records} records, {args.repeats} requests each over HTTP (target < {TARGET_MS:.0f} ms)\n")
    print(f"{'request':<60} {'median ms':>10} {'p95 ms':>8} {'KiB':>7}  ok")
    for row in rows:
        ok = "yes" if row["p95_ms"] < TARGET_MS else "NO"
        print(
            f"{row['path']:<60} {row['median_ms']:>10.1f} {row['p95_ms']:>8.1f} {row['bytes'] / 1024:>7.1f}  {ok}"
        )
    print(
        json.dumps(
            {"bench": "dashboard_load", "records": args.records, "queued": args.queued, "results": rows}
        )
    )


if __name__ == "__main__":
    main()
