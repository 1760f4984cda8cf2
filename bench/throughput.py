"""Images per second for a batch of LoRA jobs: a plain diffusers script against lorafleet.

The same work three ways, one after the other, in one run: 3 LoRA stacks x 32 seeds on a
tiny SD1.5 pipeline at 64x64 (``--size``), half of them LCM (LCM-LoRA at 0.35, 4 steps, CFG 1)
and half standard (20 steps, CFG 7), timed from the first submit to the last image stored:

- diffusers: the script a user would write, per job: load_lora_weights for each LoRA,
  set_adapters, fuse_lora, generate, unfuse_lora, unload_lora_weights, save the PNG;
- lorafleet unbatched: one worker process with LORAFLEET_MAX_BATCH=1 and
  LORAFLEET_BACKGROUND_STAGES=false, jobs submitted as one batch through the SDK;
- lorafleet as shipped: the same worker with the default settings (batched calls, waiting
  compatible jobs sampled together, PNGs encoded and stored in a background stage).

Prints images per second, the ratios (targets: shipped >= 3x diffusers, >= 2x unbatched) and
where the time went (the records' phase timings; the script's own phases), then one JSON line.
Never part of the test run.

    .venv/bin/python bench/throughput.py                      # tiny SD1.5, 64x64, CPU
    .venv/bin/python bench/throughput.py --size 256           # where the UNet's arithmetic dominates
    .venv/bin/python bench/throughput.py --shape sd15 --size 512 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

BIN = Path(sys.executable).parent
STACKS = (
    (("watercolor", 0.8),),
    (("ink-sketch", 0.75),),
    (("watercolor", 0.6), ("ink-sketch", 0.5)),
)
LCM = ("lcm-lora-sd15", 0.35)
PHASES = ("lora_load", "lora_apply", "sampling", "restore", "upload")


def jobs(seeds: int, size: int) -> list[dict]:
    """The benchmark's jobs: every stack x seed, the first half of the seeds LCM."""
    out = []
    for stack in STACKS:
        for seed in range(seeds):
            lcm = seed < seeds // 2
            loras = [*stack, LCM] if lcm else list(stack)
            out.append(
                {
                    "model": "bench-model",
                    "prompt": "a lighthouse on a cliff at dusk",
                    "seed": seed,
                    "width": size,
                    "height": size,
                    "loras": [{"name": n, "weight": w, "inject_trigger": False} for n, w in loras],
                    "sampler": "lcm" if lcm else "euler",
                    "steps": 4 if lcm else 20,
                    "cfg_scale": 1.0 if lcm else 7.0,
                }
            )
    return out


def make_home(shape: str) -> Path:
    from lorafleet.worker.tiny import make_demo_loras, make_sd15_shaped_model, make_tiny_model

    home = Path(tempfile.mkdtemp(prefix="lorafleet-throughput-"))
    model = home / "models" / "bench-model"
    if shape == "tiny":
        make_tiny_model(model)
    else:
        make_sd15_shaped_model(model)
    make_demo_loras(model, home / "autoimport" / "lora")
    return home


# ---------------------------------------------------------------------------- diffusers
def run_diffusers(home: Path, work: list[dict], device: str) -> tuple[float, dict[str, float]]:
    """The plain script: per job, LoRAs loaded, fused, sampled, unfused, unloaded, PNG saved."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        home / "models" / "bench-model", torch_dtype=dtype, safety_checker=None
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    out = Path(tempfile.mkdtemp(prefix="lorafleet-diffusers-"))
    folder = home / "autoimport" / "lora"
    phases: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    for index, job in enumerate(work):
        tick = time.perf_counter()
        names = []
        for spec in job["loras"]:
            name = spec["name"].replace("-", "_")
            pipe.load_lora_weights(str(folder / f"{spec['name']}.safetensors"), adapter_name=name)
            names.append(name)
        pipe.set_adapters(names, [spec["weight"] for spec in job["loras"]])
        pipe.fuse_lora(adapter_names=names)
        phases["lora load + fuse"] += time.perf_counter() - tick
        tick = time.perf_counter()
        pipe.scheduler = lcm if job["sampler"] == "lcm" else euler
        image = pipe(
            job["prompt"],
            num_inference_steps=job["steps"],
            guidance_scale=job["cfg_scale"],
            width=job["width"],
            height=job["height"],
            generator=torch.Generator("cpu").manual_seed(job["seed"]),
        ).images[0]
        phases["sampling"] += time.perf_counter() - tick
        tick = time.perf_counter()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        phases["unfuse + unload"] += time.perf_counter() - tick
        tick = time.perf_counter()
        image.save(out / f"{index}.png")
        phases["png save"] += time.perf_counter() - tick
    return time.perf_counter() - start, dict(phases)


# ---------------------------------------------------------------------------- lorafleet
def run_lorafleet(
    home: Path, work: list[dict], device: str, env_extra: dict[str, str]
) -> tuple[float, dict[str, float], int]:
    """One worker process with ``env_extra``; the jobs submitted as one batch; seconds from
    the submit to the last job ended, summed phase timings, largest batch size seen."""
    from lorafleet.common.schema.jobs import JobStatus
    from lorafleet.common.schema.settings import Settings
    from lorafleet.producer import Client

    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env |= {"LORAFLEET_HOME": str(home), "LORAFLEET_DEVICE": device, "PYTHONUNBUFFERED": "1"} | env_extra
    log = home / f"worker-{len(list(home.glob('worker-*.log')))}.log"
    with open(log, "wb") as handle:
        worker = subprocess.Popen(
            [
                str(BIN / "lorafleet"),
                "worker",
                "--models",
                "bench-model",
                "--preload",
                "--name",
                "bench@throughput",
            ],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 300
        while " ready." not in log.read_text(errors="replace"):
            if worker.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        with Client(Settings(home=home)) as client:
            start = time.perf_counter()
            handles = client.submit_many(work)
            records = client.wait([h.job_id for h in handles], timeout=3600)
            seconds = time.perf_counter() - start
    finally:
        worker.terminate()
        worker.wait(60)
    failed = [r for r in records if r.status is not JobStatus.succeeded]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed, e.g. {failed[0].error}")
    phases = {p: sum(getattr(r.timings, p) or 0.0 for r in records) for p in PHASES}
    return seconds, phases, max(r.timings.batch_size or 1 for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "sd15"), default="tiny", help="the UNet: tiny or SD1.5's")
    parser.add_argument("--size", type=int, default=64, help="image width and height")
    parser.add_argument("--seeds", type=int, default=32, help="seeds per LoRA stack")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()

    from lorafleet.common.infra.embedded import embedded_redis
    from lorafleet.common.schema.settings import Settings

    home = make_home(args.shape)
    work = jobs(args.seeds, args.size)
    images = len(work)
    results: dict[str, dict] = {}
    try:
        if not args.skip_diffusers:
            seconds, phases = run_diffusers(home, work, args.device)
            results["diffusers script"] = {"seconds": seconds, "phases": phases}
        unbatched = {"LORAFLEET_MAX_BATCH": "1", "LORAFLEET_BACKGROUND_STAGES": "false"}
        seconds, phases, batch = run_lorafleet(home, work, args.device, unbatched)
        results["lorafleet unbatched"] = {"seconds": seconds, "phases": phases, "batch": batch}
        seconds, phases, batch = run_lorafleet(home, work, args.device, {})
        results["lorafleet as shipped"] = {"seconds": seconds, "phases": phases, "batch": batch}
    finally:
        embedded_redis(Settings(home=home)).stop()

    shipped = images / results["lorafleet as shipped"]["seconds"]
    print(f"\n{images} jobs ({args.shape} UNet, {args.size}x{args.size}, {args.device}), one image each\n")
    print(f"{'':24} {'seconds':>8} {'images/s':>9} {'shipped is':>11}  largest batch")
    for name, result in results.items():
        rate = images / result["seconds"]
        result["images_per_second"] = rate
        batch = result.get("batch", 1)
        print(f"{name:24} {result['seconds']:8.2f} {rate:9.2f} {shipped / rate:10.2f}x  {batch}")
    print("\nwhere the time went (seconds, summed over jobs; lorafleet's phases overlap in the shipped run):")
    for name, result in results.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in result["phases"].items())
        print(f"  {name}: {parts}")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {
        "bench": "throughput",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "device": args.device,
        "torch": torch.__version__,
        "commit": commit,
        "shape": args.shape,
        "size": args.size,
        "images": images,
        "results": results,
    }
    if "diffusers script" in results:
        summary["shipped_vs_diffusers"] = shipped / results["diffusers script"]["images_per_second"]
    summary["shipped_vs_unbatched"] = shipped / results["lorafleet unbatched"]["images_per_second"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
