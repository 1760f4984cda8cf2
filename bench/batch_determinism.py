"""Does an image change when it is sampled in a batch, and with which companions?

For a few seeds, image "seed s" is sampled alone, then in batches of 2, 4 and 8 at every
position, with two different sets of companions (other seeds, other prompts). Prints, per
batch size, the largest pixel difference (0-255) from the image sampled alone, and whether
the same batch size with other companions gave the very same pixels.

    python bench/batch_determinism.py [--size 64] [--steps 6] [--seeds 3] [--device cpu]
    python bench/batch_determinism.py --steps 1 --seeds 1      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sampler", default="euler_a")
    parser.add_argument("--seeds", type=int, default=3, help="how many target seeds (11, 12, ...)")
    args = parser.parse_args()

    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.common.schema.jobs import parse_job
    from lorafleet.common.schema.settings import Settings
    from lorafleet.worker.pipelines import load_pipeline
    from lorafleet.worker.run.sampling import conditioning, sample
    from lorafleet.worker.tiny import make_tiny_model

    home = Path(tempfile.mkdtemp(prefix="lorafleet-determinism-"))
    make_tiny_model(home / "models" / "tiny-sd15")
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hot = load_pipeline(ModelRegistry(Settings(home=home)).get("tiny-sd15"), device, dtype)

    def job(prompt: str):
        fields = {"model": "tiny-sd15", "prompt": prompt, "seed": 1, "steps": args.steps}
        fields |= {"width": args.size, "height": args.size, "sampler": args.sampler}
        return parse_job(fields)

    target = job("a lighthouse at night")
    others = [job("a harbour"), job("a red boat, watercolor"), job("mountains")]
    cond = {j.prompt: conditioning(hot.pipe, j) for j in [target, *others]}

    def run(seeds: list[int], prompts: list[str]) -> list[np.ndarray]:
        images = sample(
            hot.pipe, hot.scheduler_config, target, [cond[p] for p in prompts], seeds, lambda s: None
        )
        return [np.asarray(i, dtype=np.int16) for i in images]

    rows = []
    for seed in range(11, 11 + args.seeds):
        alone = run([seed], [target.prompt])[0]
        for size in (2, 4, 8):
            worst, same = 0, True
            for position in range(size):
                outputs = []
                for variant in range(2):
                    seeds = [1000 * (variant + 1) + k for k in range(size)]
                    prompts = [others[(k + variant) % 3].prompt for k in range(size)]
                    seeds[position], prompts[position] = seed, target.prompt
                    outputs.append(run(seeds, prompts)[position])
                worst = max(
                    worst, int(np.abs(outputs[0] - alone).max()), int(np.abs(outputs[1] - alone).max())
                )
                same = same and bool(np.array_equal(outputs[0], outputs[1]))
            rows.append(
                {"seed": seed, "batch": size, "max_diff_vs_alone": worst, "companions_irrelevant": same}
            )
    print(f"{'seed':>5} {'batch':>5} {'max |diff| vs alone':>20} {'same pixels, other companions':>30}")
    for row in rows:
        print(
            f"{row['seed']:>5} {row['batch']:>5} {row['max_diff_vs_alone']:>20} {str(row['companions_irrelevant']):>30}"
        )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        json.dumps(
            {
                "bench": "batch_determinism",
                "machine": platform.machine(),
                "device": str(device),
                "torch": torch.__version__,
                "commit": commit,
                "size": args.size,
                "steps": args.steps,
                "sampler": args.sampler,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
