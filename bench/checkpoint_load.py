"""Loading a single-file checkpoint against the same model as a diffusers folder.

An SD 1.5-shaped pipeline with random weights (nothing downloaded; ``--shape tiny``: the
tests' tiny SD 1.5 pipeline, for a smoke run) is saved as a diffusers folder and written as
one original-layout .safetensors checkpoint with lorafleet's own converter. Then, each in a
fresh PipelineCache (as a new worker would):

  folder       the diffusers folder, from_pretrained
  checkpoint   the checkpoint, first load: diffusers' single-file loader, then the
               converted copy is saved under <home>/cache/checkpoints
  again        the checkpoint, second load: from that converted copy

Prints seconds side by side and the ratios to the folder load, then one JSON line with the
machine and the commit. Never part of the test run.

    .venv/bin/python bench/checkpoint_load.py             # CPU, float32, 3 repeats
    .venv/bin/python bench/checkpoint_load.py --repeats 5
    .venv/bin/python bench/checkpoint_load.py --shape tiny --repeats 1   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.checkpoint_format import write_single_file
from lorafleet.worker.pipelines import PipelineCache
from lorafleet.worker.tiny import make_sd15_shaped_model, make_tiny_model


def timed_load(settings: Settings, name: str) -> float:
    model = ModelRegistry(settings).get(name)
    start = time.perf_counter()
    PipelineCache(settings).get(model)
    return time.perf_counter() - start


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shape", choices=("sd15", "tiny"), default="sd15", help="the pipeline: SD 1.5's shapes or tiny"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        make_model = make_sd15_shaped_model if args.shape == "sd15" else make_tiny_model
        folder = make_model(home / "models" / "sd15-folder")
        print(f"built an SD 1.5 pipeline ({args.shape} shapes) with random weights", flush=True)
        write_single_file(folder, home / "autoimport" / "main" / "sd15-file.safetensors", "sd15")
        settings = Settings(
            home=home, device="cpu", dtype="float32", checkpoint_configs={"sd15": str(folder)}
        )
        rows = {"folder": [], "checkpoint": [], "again": []}
        for _ in range(args.repeats):
            shutil.rmtree(settings.converted_dir, ignore_errors=True)
            rows["folder"].append(timed_load(settings, "sd15-folder"))
            rows["checkpoint"].append(timed_load(settings, "sd15-file"))
            rows["again"].append(timed_load(settings, "sd15-file"))
    median = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n{'load':<12}{'median s':>10}{'x folder':>10}")
    for name, seconds in median.items():
        print(f"{name:<12}{seconds:>10.2f}{seconds / median['folder']:>10.2f}")
    print(
        json.dumps(
            {
                "bench": "checkpoint_load",
                "commit": commit(),
                "machine": {"platform": platform.platform(), "threads": os.cpu_count(), "device": "cpu"},
                "shape": args.shape,
                "repeats": args.repeats,
                "seconds": rows,
                "median": median,
                "checkpoint_over_folder": median["checkpoint"] / median["folder"],
                "again_over_folder": median["again"] / median["folder"],
            }
        )
    )


if __name__ == "__main__":
    main()
