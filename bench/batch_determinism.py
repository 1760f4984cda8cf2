"""Does an image change with the batch it is sampled in? On every family, every batch size.

For each family's tiny pipeline and each number of rows R from 1 to ``--max-rows``, image
"seed s" is sampled:

- the way lorafleet does (every call has the batch size's rows, worker/run/batching.py):
  in a call of R rows, once filled with copies of itself, once with R-1 companions (other
  seeds, other prompts), at the first and at the last position. The floats must be equal,
  bit for bit: the companions must not matter.
- the way a call sized to its images does (diffusers' own, and lorafleet's before): in a call
  of exactly its images, R of them. Printed: the largest float and pixel difference from the
  image sampled in a one-row call. Those differences are why the row count is fixed.

    python bench/batch_determinism.py                      # every tiny family, rows 1..8
    python bench/batch_determinism.py --families sd15 --max-rows 4 --steps 1   # a smoke run
    python bench/batch_determinism.py --device cuda        # what bench/gpu_check.sh runs
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

PROMPTS = (
    "a lighthouse at night",
    "a harbour at dawn",
    "a red boat at sea",
    "the mountains at dusk",
    "a harbour",
    "a red boat, watercolor",
    "mountains",
    "a cat",
)
"""The target's prompt first; companions are those whose embeddings have its shapes (a
worker samples only such images together: an LLM encoder's length follows the prompt)."""


def measure(family: str, home: Path, args, device: torch.device) -> list[dict]:
    from lorafleet.common.catalog.models import ModelRegistry
    from lorafleet.common.schema.jobs import parse_job
    from lorafleet.common.schema.settings import Settings
    from lorafleet.producer.family_rules import apply_family_rules
    from lorafleet.worker.pipelines import load_pipeline
    from lorafleet.worker.run.sampling import conditioning, sample
    from lorafleet.worker.tiny import make_tiny_model

    make_tiny_model(home / "models" / family, family=family)
    model = ModelRegistry(Settings(home=home)).get(family)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    hot = load_pipeline(model, device, dtype)

    def job(prompt: str):
        fields = {"model": family, "prompt": prompt, "seed": 1, "steps": args.steps}
        parsed = parse_job(fields | {"width": args.size, "height": args.size})
        apply_family_rules(parsed, model, "", [])
        return parsed

    jobs = {prompt: job(prompt) for prompt in PROMPTS}
    target = jobs[PROMPTS[0]]
    cond = {prompt: conditioning(hot.pipe, j) for prompt, j in jobs.items()}
    shapes = {name: t.shape for name, t in cond[PROMPTS[0]].items()}
    others = [p for p in PROMPTS[1:] if {n: t.shape for n, t in cond[p].items()} == shapes][:3]
    others = others or [PROMPTS[0]]  # no prompt of the same length: other seeds only

    def run(seeds: list[int], prompts: list[str], rows: int) -> list[np.ndarray]:
        conds = [cond[p] for p in prompts]
        images = sample(hot.pipe, hot.scheduler_config, target, conds, seeds, lambda s: None, rows, "np")
        return [np.asarray(image, dtype=np.float32) for image in images]

    def pixels(image: np.ndarray) -> np.ndarray:
        return np.round(np.clip(image, 0, 1) * 255).astype(np.int16)

    found = []
    for seed in range(11, 11 + args.seeds):
        one_row = run([seed], [PROMPTS[0]], 1)[0]
        for rows in range(1, args.max_rows + 1):
            alone = run([seed], [PROMPTS[0]], rows)[0]
            fixed_same = True
            for position in sorted({0, rows - 1}):
                seeds = [1000 + k for k in range(rows)]
                prompts = [others[k % len(others)] for k in range(rows)]
                seeds[position], prompts[position] = seed, PROMPTS[0]
                fixed_same &= bool(np.array_equal(run(seeds, prompts, rows)[position], alone))
            found.append(
                {
                    "family": family,
                    "seed": seed,
                    "rows": rows,
                    "fixed_rows_companions_irrelevant": fixed_same,
                    "sized_to_images_max_float_diff": float(np.abs(alone - one_row).max()),
                    "sized_to_images_max_pixel_diff": int(np.abs(pixels(alone) - pixels(one_row)).max()),
                }
            )
    return found


def main() -> None:
    from lorafleet.worker.tiny import TINY_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=[f for f in TINY_FAMILIES if f != "flux1-schnell"])
    parser.add_argument("--max-rows", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1, help="how many target seeds (11, 12, ...)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    home = Path(tempfile.mkdtemp(prefix="lorafleet-determinism-"))
    rows = [row for family in args.families for row in measure(family, home, args, device)]

    print(
        f"\n{'family':<11}{'seed':>5}{'rows':>5}  {'fixed rows: same floats':>24}  {'call of its images: max diff vs one row':>40}"
    )
    for row in rows:
        diff = f"{row['sized_to_images_max_float_diff']:.2e} ({row['sized_to_images_max_pixel_diff']}/255)"
        print(
            f"{row['family']:<11}{row['seed']:>5}{row['rows']:>5}  "
            f"{str(row['fixed_rows_companions_irrelevant']):>24}  {diff:>40}"
        )
    failures = [r for r in rows if not r["fixed_rows_companions_irrelevant"]]
    print(
        f"\n{'every' if not failures else 'NOT every'} row's floats were independent of its companions "
        f"({len(rows) - len(failures)}/{len(rows)})"
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
                "all_independent": not failures,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
