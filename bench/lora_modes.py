"""How far apart are a job's images in the two LoRA modes, merged and on side paths? Every family.

For each family's tiny pipeline and each of its demo LoRAs that has a side path, one job
(seed 11, CFG on) is sampled with the LoRA merged into the weights (the patcher, as
``lora_mode`` merge runs it) and on side paths (as ``lora_mode`` side runs it), in calls of
the same rows. Printed per LoRA: the largest pixel difference (0-255), the PSNR between the
two images, and how far the LoRA itself moves the image (against the plain model), for scale.
The modes differ by float rounding only: a merge rounds W₀ + ΔW once, a side path rounds
the base output and the LoRA's term apart.

    python bench/lora_modes.py                          # every tiny family (~3 min on CPU)
    python bench/lora_modes.py --families sd15 --steps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

ROWS = 2
STRENGTH = 0.8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(family: str, home: Path, steps: int) -> list[dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lorafleet.common.catalog.lora_files import describe_file
    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.common.schema.jobs import parse_job
    from lorafleet.common.schema.settings import Settings
    from lorafleet.producer.family_rules import apply_family_rules
    from lorafleet.worker.lora.formats import parse_lora
    from lorafleet.worker.lora.module_index import TEXT_ENCODERS
    from lorafleet.worker.lora.patcher import StackEntry
    from lorafleet.worker.lora.side_paths import SidePaths, side_path_ok
    from lorafleet.worker.pipelines import load_pipeline
    from lorafleet.worker.run.sampling import conditioning, sample
    from lorafleet.worker.tiny import make_demo_loras, make_tiny_model

    folder = make_tiny_model(home / "models" / family, family=family)
    files = make_demo_loras(folder, home / f"{family}-loras")
    model = ModelRegistry(Settings(home=home)).get(family)
    hot = load_pipeline(model, torch.device("cpu"), torch.float32)
    job = parse_job({"model": family, "prompt": "a lighthouse at night", "seed": 11, "steps": steps})
    job.width = job.height = 64
    job.negative_prompt = "fog"
    apply_family_rules(job, model, "", [])
    job.cfg_scale = 3.0  # guidance on: diffusers doubles the rows, the flow families call twice

    def image() -> np.ndarray:
        cond = conditioning(hot.pipe, job)
        out = sample(hot.pipe, hot.scheduler_config, job, [cond], [job.seed], lambda s: None, ROWS)[0]
        return np.asarray(out, dtype=np.int16)

    plain = image()
    denoiser = {n: m for n, m in hot.patcher.components.items() if n not in TEXT_ENCODERS}
    found = []
    for path in files:
        info = describe_file(Path(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        parsed = parse_lora(
            load_file(str(path)),
            hot.patcher.index,
            info.format,
            metadata=metadata,
            original=hot.patcher.original,
        )
        if side_path_ok(parsed) is not None:
            continue
        # the text encoders take the LoRA merged in both modes (side paths serve the denoiser)
        hot.patcher.apply([StackEntry(parsed, STRENGTH, STRENGTH)])
        merged = image()
        hot.patcher.apply([StackEntry(parsed, 0.0, STRENGTH)])
        try:
            with SidePaths.build(denoiser, [[(parsed, STRENGTH)]] * ROWS).attached():
                side = image()
        finally:
            hot.patcher.restore()
        found.append(
            {
                "family": family,
                "lora": Path(path).stem,
                "format": info.format,
                "max_pixel_diff": int(np.abs(side - merged).max()),
                "psnr_db": psnr(side, merged),
                "lora_effect_max_pixel_diff": int(np.abs(merged - plain).max()),
            }
        )
    return found


def main() -> None:
    from lorafleet.worker.tiny import TINY_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=[f for f in TINY_FAMILIES if f != "flux1-schnell"])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lorafleet-modes-"))
    rows = [row for family in args.families for row in measure(family, home, args.steps)]
    print(f"\n{'family':<11}{'LoRA':<34}{'max |side - merge|':>19}{'PSNR dB':>9}{'LoRA effect':>13}")
    for row in rows:
        print(
            f"{row['family']:<11}{row['lora']:<34}{row['max_pixel_diff']:>17}/255"
            f"{row['psnr_db']:>9.1f}{row['lora_effect_max_pixel_diff']:>9}/255"
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    for row in rows:
        row["psnr_db"] = None if math.isinf(row["psnr_db"]) else row["psnr_db"]  # JSON has no inf
    print(
        json.dumps(
            {
                "bench": "lora_modes",
                "machine": platform.machine(),
                "torch": torch.__version__,
                "commit": commit.strip(),
                "steps": args.steps,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
