"""The whole path with real processes: the CLI submits, a `lorafleet worker` process renders.

Each test here is what a user would type: commands in a shell against a real Redis (a
separate redis-server, or the embedded one), a real worker process, real storage (a folder,
or moto's S3 server over HTTP).
"""

from __future__ import annotations

import json
import os
import re

import boto3
import pytest
from PIL import Image

from lorafleet.common.schema import keys
from tests.conftest import TINY, TINY_XL, copy_home
from tests.helpers import RedisProcess, WorkerProcess, lorafleet_env, run_cli, s3_env, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(template_home, tmp_path_factory):
    """A Redis, a home and one worker serving the tiny model, for the whole module."""
    root = tmp_path_factory.mktemp("e2e")
    redis = RedisProcess(root / "redis").start()
    home = copy_home(template_home, root / "home")
    env = lorafleet_env(home, redis.url, str(root / "outputs"))
    worker = WorkerProcess(env, TINY, root / "worker.log").start()
    yield {"env": env, "redis": redis, "home": home, "outputs": root / "outputs", "worker": worker}
    worker.stop()
    redis.stop()


def queued(redis: RedisProcess, model: str = TINY) -> int:
    client = redis.client()
    return sum(client.llen(key) for key in keys.priority_lists(keys.queue(model)))


def test_cli_submit_with_a_lora_stack_writes_a_png_naming_both_loras(stack):
    result = run_cli(
        [
            "submit",
            "--model",
            TINY,
            "--prompt",
            "a lighthouse at night",
            "--lora",
            "watercolor:0.8",
            "--lora",
            "lcm-lora-sd15:0.35",
            "--sampler",
            "lcm",
            "--steps",
            "4",
            "--cfg",
            "1",
            "--wait",
        ],
        stack["env"],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    uris = re.findall(r"file://\S+\.png", result.stdout)
    assert len(uris) == 1, result.stdout
    path = uris[0][len("file://") :]
    assert path.startswith(str(stack["outputs"]))
    parameters = Image.open(path).text["parameters"]
    assert "<lora:watercolor:0.8>" in parameters and "<lora:lcm-lora-sd15:0.35>" in parameters
    assert "Sampler: LCM" in parameters and "Lora hashes:" in parameters


@pytest.mark.parametrize(
    "args, words",
    [
        (["--width", "100"], "width: must be a multiple of 8 from 64 to 2048, got 100"),
        (["--lora", "no-such-lora:0.5"], "loras[0].name: unknown LoRA 'no-such-lora'"),
        (["--steps", "0"], "steps: must be a whole number from 1 to 150"),
        (["--lora", "watercolor:9"], "loras[0].weight: must be a number from -4 to 4"),
    ],
)
def test_cli_refuses_bad_input_naming_the_field_and_queues_nothing(stack, args, words):
    before = queued(stack["redis"])
    result = run_cli(["submit", "--model", TINY, "--prompt", "x", *args], stack["env"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert words in " ".join(result.stderr.split()), result.stderr
    assert queued(stack["redis"]) == before


def test_cli_unknown_model_names_what_is_registered(stack):
    result = run_cli(["submit", "--model", "nope", "--prompt", "x"], stack["env"])
    assert result.returncode == 2
    assert "model: unknown model 'nope'" in result.stderr and "tiny-sd15" in result.stderr


def test_submit_file_queues_a_batch_and_status_shows_it(stack, tmp_path):
    lines = [
        {"model": TINY, "prompt": "a red castle", "seed": 1},
        {
            "model": TINY,
            "prompt": "a blue castle",
            "seed": 2,
            "loras": [{"name": "ink-sketch", "weight": 0.7}],
        },
        {"model": TINY, "prompt": "a gold castle", "lcm": True},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = run_cli(["submit-file", str(path), "--wait", "--json"], stack["env"])
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [r["status"] for r in records] == ["succeeded"] * 3
    assert len({r["job"]["batch_id"] for r in records}) == 1
    assert records[2]["job"]["loras"][0]["name"] == "lcm-lora-sd15"
    status = run_cli(["status", "--batch", records[0]["job"]["batch_id"], "--json"], stack["env"])
    assert [r["job"]["job_id"] for r in json.loads(status.stdout)] == [r["job"]["job_id"] for r in records]


def test_submit_file_with_one_bad_line_queues_nothing(stack, tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        json.dumps({"model": TINY, "prompt": "ok"})
        + "\n"
        + json.dumps({"model": TINY, "prompt": "x", "width": 12})
        + "\n"
    )
    before = queued(stack["redis"])
    result = run_cli(["submit-file", str(path)], stack["env"])
    assert result.returncode == 2 and "jobs[1].width" in result.stderr
    assert queued(stack["redis"]) == before


def test_count_submits_consecutive_seeds_and_wait_shows_the_timings(stack):
    result = run_cli(
        [
            "submit",
            "--model",
            TINY,
            "--prompt",
            "a cat",
            "--count",
            "3",
            "--seed",
            "10",
            "--images",
            "2",
            "--json",
        ],
        stack["env"],
    )
    handles = json.loads(result.stdout)
    assert len(handles) == 3
    waited = run_cli(["wait", *[h["job_id"] for h in handles]], stack["env"])
    assert waited.returncode == 0, waited.stderr
    assert "sample" in waited.stdout and waited.stdout.count(".png") == 6
    status = run_cli(["status", handles[2]["job_id"], "--json"], stack["env"])
    record = json.loads(status.stdout)[0]
    assert [image["seed"] for image in record["images"]] == [14, 15]


def test_cancel_from_the_cli_of_a_queued_job_and_of_a_running_one(stack):
    env = stack["env"]
    # Queue a long job first so that the second is still queued when it is cancelled.
    long = json.loads(
        run_cli(
            [
                "submit",
                "--model",
                TINY,
                "--prompt",
                "long",
                "--steps",
                "150",
                "--width",
                "256",
                "--height",
                "256",
                "--images",
                "3",
                "--json",
            ],
            env,
        ).stdout
    )[0]
    short = json.loads(run_cli(["submit", "--model", TINY, "--prompt", "short", "--json"], env).stdout)[0]
    assert "cancelled" in run_cli(["cancel", short["job_id"]], env).stdout

    def sampling():
        record = json.loads(run_cli(["status", long["job_id"], "--json"], env).stdout)[0]
        return record["status"] == "running" and record["progress"]["step"] >= 1

    wait_until(sampling, timeout=60, what="the long job to be sampling")
    run_cli(["cancel", long["job_id"]], env)
    waited = run_cli(["wait", long["job_id"], short["job_id"], "--json", "--timeout", "120"], env)
    records = json.loads(waited.stdout)
    assert [r["status"] for r in records] == ["cancelled", "cancelled"] and waited.returncode == 1
    assert records[0]["error"] == "cancelled while running" and records[0]["progress"]["step"] < 450
    assert records[1]["error"] == "cancelled before it ran" and records[1]["started_at"] is None
    after = run_cli(["submit", "--model", TINY, "--prompt", "after", "--lcm", "--wait", "--json"], env)
    assert json.loads(after.stdout)[0]["status"] == "succeeded"  # the worker goes on


def test_images_go_to_s3_through_a_real_server(stack, moto_server, tmp_path):
    boto3.client(
        "s3",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="renders")
    env = stack["env"] | s3_env(moto_server.endpoint) | {"LORAFLEET_STORAGE_URL": "s3://renders/fleet"}
    # This worker serves the tiny SDXL model, so only it takes the job (the module's worker
    # serves tiny-sd15 and writes to a folder).
    worker = WorkerProcess(env, TINY_XL, tmp_path / "s3-worker.log").start()
    try:
        result = run_cli(["submit", "--model", TINY_XL, "--prompt", "to the bucket", "--wait", "--json"], env)
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)[0]
        image = record["images"][0]
        assert image["uri"] == f"s3://renders/fleet/{image['key']}"
        s3 = boto3.client(
            "s3",
            endpoint_url=moto_server.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        obj = s3.get_object(Bucket="renders", Key=f"fleet/{image['key']}")
        assert obj["ContentType"] == "image/png" and obj["ContentLength"] == image["size"]
        assert "Model: tiny-sdxl" in Image.open(obj["Body"]).text["parameters"]
    finally:
        worker.stop()


def test_jobs_queued_with_no_worker_all_run_once_one_starts_even_after_the_embedded_redis_restarts(
    template_home, tmp_path
):
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, None)  # no broker URL: the embedded Redis
    result = run_cli(["submit", "--model", TINY, "--prompt", "waiting", "--count", "4", "--json"], env)
    assert result.returncode == 0, result.stderr
    ids = [h["job_id"] for h in json.loads(result.stdout)]
    assert run_cli(["redis", "status"], env).returncode == 0
    assert run_cli(["redis", "stop"], env).stdout.strip() == "stopped"
    assert run_cli(["redis", "status"], env).returncode == 1
    worker = WorkerProcess(env, TINY, tmp_path / "worker.log").start()  # starts the embedded Redis again
    try:
        waited = run_cli(["wait", *ids, "--json", "--timeout", "120"], env)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        records = json.loads(waited.stdout)
        assert [r["status"] for r in records] == ["succeeded"] * 4
        assert all(os.path.exists(r["images"][0]["uri"][len("file://") :]) for r in records)
    finally:
        worker.stop()
        run_cli(["redis", "stop"], env)
