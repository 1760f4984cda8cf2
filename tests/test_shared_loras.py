"""LoRAs across machines: imported once into the object store and Redis, fetched by workers
that never had the file, checked by hash; a missing or corrupt object fails the job saying so.

Three homes stand for three machines sharing only Redis and the S3 server: one imports, one
submits, one works — the last two with empty autoimport folders.
"""

from __future__ import annotations

import io
import json
import shutil

import boto3
import pytest
from PIL import Image

from lorafleet.common.catalog.lora_files import sha256_file
from tests.conftest import TINY, copy_home
from tests.helpers import MotoServer, RedisProcess, WorkerProcess, lorafleet_env, run_cli, s3_env

pytestmark = pytest.mark.slow


@pytest.fixture
def machines(template_home, tmp_path):
    redis = RedisProcess(tmp_path / "redis").start()
    moto = MotoServer().start()
    s3 = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="fleet")
    files = tmp_path / "downloads"
    shutil.copytree(template_home / "autoimport" / "lora", files)
    envs = {}
    for machine in ("importer", "submitter", "worker"):
        home = copy_home(template_home, tmp_path / machine)
        if machine != "importer":
            shutil.rmtree(home / "autoimport" / "lora")
        shutil.rmtree(home / "autoimport" / "lora", ignore_errors=True)
        envs[machine] = lorafleet_env(home, redis.url, "s3://fleet/out", **s3_env(moto.endpoint))
    worker = WorkerProcess(envs["worker"], TINY, tmp_path / "worker.log", name="far@away").start()
    yield {
        "env": envs,
        "files": files,
        "s3": s3,
        "worker": worker,
        "cache": tmp_path / "worker" / "cache" / "loras",
    }
    worker.stop()
    moto.stop()
    redis.stop()


def submit(env, *loras: str) -> dict:
    args = ["submit", "--model", TINY, "--prompt", "shared", "--seed", "4", "--wait", "--json"]
    for lora in loras:
        args += ["--lora", lora]
    result = run_cli(args, env)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)[0]


def test_an_imported_lora_is_fetched_by_a_worker_that_never_had_it(machines):
    env, files, s3 = machines["env"], machines["files"], machines["s3"]
    sha = sha256_file(files / "watercolor.safetensors")
    imported = run_cli(
        ["loras", "import", str(files / "watercolor.safetensors"), "--name", "aquarelle"], env["importer"]
    )
    assert imported.returncode == 0, imported.stderr
    assert f"stored as loras/{sha}.safetensors" in " ".join(imported.stdout.split())
    assert s3.head_object(Bucket="fleet", Key=f"out/loras/{sha}.safetensors")["ContentLength"] > 0
    again = run_cli(
        ["loras", "import", str(files / "watercolor.safetensors"), "--name", "aquarelle"], env["importer"]
    )
    assert "already stored" in again.stdout

    listed = {r["name"]: r for r in json.loads(run_cli(["loras", "list", "--json"], env["submitter"]).stdout)}
    assert listed["aquarelle"]["where"] == "shared" and listed["aquarelle"]["family"] == "sd15"
    record = submit(env["submitter"], "aquarelle:0.8")
    assert record["status"] == "succeeded", record["error"]
    assert record["job"]["loras"][0]["sha256"] == sha and record["timings"]["lora_misses"] == 1
    assert sorted(p.name for p in machines["cache"].iterdir()) == [f"{sha}.safetensors"]
    stored = s3.get_object(Bucket="fleet", Key=f"out/{record['images'][0]['key']}")["Body"].read()
    parameters = Image.open(io.BytesIO(stored)).text["parameters"]
    assert (
        "<lora:aquarelle:0.8>" in parameters and f"aquarelle: {sha[:12]}" in parameters
    )  # its name, not its hash
    inspected = run_cli(["loras", "inspect", "aquarelle", "--model", TINY, "--json"], env["submitter"])
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["name"] == "aquarelle" and report["sha256"] == sha and report["match"]["unmatched"] == []
    # The same picture as a machine that had the file all along would make.
    local = submit(env["importer"], "aquarelle:0.8")
    assert local["images"][0]["sha256"] == record["images"][0]["sha256"]


def test_a_missing_or_corrupt_stored_lora_fails_the_job_with_the_reason(machines):
    env, files, s3 = machines["env"], machines["files"], machines["s3"]
    for name in ("ink-sketch", "texture-locon"):
        assert (
            run_cli(["loras", "import", str(files / f"{name}.safetensors")], env["importer"]).returncode == 0
        )
    ink = sha256_file(files / "ink-sketch.safetensors")
    s3.put_object(Bucket="fleet", Key=f"out/loras/{ink}.safetensors", Body=b"not the file")
    corrupt = submit(env["submitter"], "ink-sketch")
    assert corrupt["status"] == "failed"
    assert "the stored object is corrupt" in corrupt["error"] and "ink-sketch" in corrupt["error"]
    texture = sha256_file(files / "texture-locon.safetensors")
    s3.delete_object(Bucket="fleet", Key=f"out/loras/{texture}.safetensors")
    missing = submit(env["submitter"], "texture-locon")
    assert missing["status"] == "failed" and "missing from the store" in missing["error"]
    assert not (machines["cache"] / f"{ink}.safetensors").exists()
    unknown = run_cli(["submit", "--model", TINY, "--prompt", "x", "--lora", "nowhere"], env["submitter"])
    assert unknown.returncode == 2 and "loras import" in " ".join(unknown.stderr.split())
