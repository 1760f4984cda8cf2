"""`make demo`: the whole path on one machine with zero configuration.

Builds the tiny offline model and demo LoRAs (once), starts the embedded Redis and one
worker, submits a batch of jobs (standard samplers, LCM with the LCM-LoRA at InvokeAI's LoRA guidance's
0.35, stacks of two LoRAs), shows their progress, prints each job's timings and where its
PNG went, restyles the first image with a LoRA (img2img), and stops what it started.
Everything lives under .demo/ in the repository.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from lorafleet.common.infra.embedded import embedded_redis
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from lorafleet.producer.cli.display import WaitDisplay, print_report

REPO = Path(__file__).resolve().parent.parent
HOME = REPO / ".demo" / "home"
MODEL = "tiny-sd15"
BIN = Path(sys.executable).parent
console = Console()

JOBS = [
    # standard sampling
    {"prompt": "a lighthouse on a cliff at night", "sampler": "euler_a", "steps": 20},
    {
        "prompt": "a red castle in the snow",
        "sampler": "dpmpp_2m_karras",
        "steps": 20,
        "loras": [{"name": "watercolor", "weight": 0.8}],
    },
    {
        "prompt": "a forest river at sunset",
        "sampler": "ddim",
        "steps": 20,
        "negative_prompt": "blue",
        "loras": [{"name": "texture-locon"}],
    },
    # LCM: the recipe of InvokeAI's LoRA guidance (LCM scheduler, CFG 1, 4 steps, the LCM-LoRA at 0.35)
    {"prompt": "a robot portrait, neon light", "lcm": True},
    {"prompt": "a cat in a flower field", "lcm": True, "loras": [{"name": "watercolor"}]},  # 0.45 beside LCM
    {
        "prompt": "an old bridge over the sea",
        "sampler": "lcm",
        "steps": 6,
        "loras": [{"name": "lcm-lora-sd15", "weight": 0.35}, {"name": "ink-sketch", "weight": 0.45}],
    },
    # stacks of two LoRAs at different weights
    {
        "prompt": "a city at night, ink sketch",
        "sampler": "euler",
        "steps": 15,
        "loras": [{"name": "watercolor", "weight": 0.75}, {"name": "ink-sketch", "weight": 0.6}],
    },
    {
        "prompt": "a mountain castle, gold light",
        "sampler": "dpmpp_2m",
        "steps": 15,
        "num_images": 2,
        "loras": [
            {"name": "texture-locon", "weight": 1.0},
            {"name": "watercolor", "weight": 0.5, "text_encoder_weight": 0.2},
        ],
    },
    {
        "prompt": "a dog on the beach",
        "sampler": "euler_a",
        "steps": 15,
        "seed": 7,
        "loras": [{"name": "ink-sketch", "weight": 0.9}, {"name": "texture-locon", "weight": 0.4}],
    },
]


def lorafleet(*args: str) -> None:
    subprocess.run(
        [str(BIN / "lorafleet"), *args], check=True, env=os.environ | {"LORAFLEET_HOME": str(HOME)}
    )


def prepare() -> None:
    model_dir = HOME / "models" / MODEL
    if not (model_dir / "model_index.json").exists():
        console.rule("building the tiny offline model")
        lorafleet("make-tiny-model", str(model_dir), "--family", "sd15")
    lora_dir = HOME / "autoimport" / "lora"
    if not (lora_dir / "lcm-lora-sd15.safetensors").exists():
        console.rule("writing demo LoRAs")
        lorafleet("make-demo-loras", "--model", str(model_dir), "--out", str(lora_dir))


def start_worker(log: Path) -> subprocess.Popen:
    env = os.environ | {"LORAFLEET_HOME": str(HOME), "PYTHONUNBUFFERED": "1"}
    handle = open(log, "wb")
    worker = subprocess.Popen(
        [str(BIN / "lorafleet"), "worker", "--models", MODEL, "--preload"],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while " ready." not in log.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start; its log:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return worker


def restyle(client: Client, record) -> None:
    """Images in: the batch's first image, restyled with a LoRA (img2img, A1111's strength)."""
    from lorafleet.common.infra.storage import open_storage

    console.rule("restyling the first image with a LoRA (img2img)")
    image = client.upload_image(open_storage(client.settings).get(record.images[0].key))
    job = {"model": MODEL, "prompt": "a watercolor painting", "init_image": image, "strength": 0.6}
    handle = client.submit(job | {"loras": [{"name": "watercolor", "weight": 0.8}], "seed": 7})
    [done] = client.wait([handle.job_id], timeout=600)
    if done.status.value != "succeeded":
        raise SystemExit(f"the restyle did not succeed: {done.error}")
    console.print(f"{image} restyled: {done.images[0].uri}", highlight=False)


def main() -> None:
    for key in [k for k in os.environ if k.startswith("LORAFLEET_")]:
        del os.environ[key]  # the demo is the zero-configuration path
    os.environ["LORAFLEET_HOME"] = str(HOME)
    prepare()
    settings = Settings(home=HOME)
    embedded = embedded_redis(settings)
    redis_was_running = embedded.ping()
    console.rule("embedded Redis and one worker")
    console.print(
        f"Redis: {embedded.ensure_running()} (append-only file in {embedded.folder})", highlight=False
    )
    log = HOME.parent / "worker.log"
    worker = start_worker(log)
    console.print(f"worker: pid {worker.pid}, serving {MODEL}, log in {log}", highlight=False)
    try:
        with Client(settings) as client:
            console.rule(f"submitting {len(JOBS)} jobs as one batch")
            handles = client.submit_many([{"model": MODEL} | job for job in JOBS])
            console.print(f"batch {handles[0].batch_id}", highlight=False)
            ids = [h.job_id for h in handles]
            with WaitDisplay(console, ids) as display:
                records = client.wait(ids, timeout=600, on_update=display.update)
            print_report(console, records)
            failed = [r for r in records if r.status.value != "succeeded"]
            if failed:
                raise SystemExit(f"{len(failed)} jobs did not succeed")
            restyle(client, records[0])
    finally:
        console.rule("stopping what the demo started")
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
        console.print("worker stopped")
        if not redis_was_running:
            embedded.stop()
            console.print("embedded Redis stopped")


if __name__ == "__main__":
    main()
