"""Sweeps: a base job and axes expanded into one batch (all or nothing), each job tagged with its
axis values; when the batch ends a labelled grid is stored beside the images; `lorafleet fetch`
downloads the batch with a manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.common.services.batches import BatchEnds
from lorafleet.common.services.grids import LABEL_HEIGHT, LABEL_WIDTH
from lorafleet.common.services.sweeps import SweepSpec, expand, read_layout
from lorafleet.producer import Client
from lorafleet.producer.api import create_app
from tests.conftest import TINY, copy_home
from tests.helpers import WorkerProcess, lorafleet_env, run_cli, wait_until
from tests.worker.conftest import make_runner

BASE = {
    "model": TINY,
    "prompt": "a lighthouse",
    "seed": 100,
    "steps": 2,
    "loras": [{"name": "ink-sketch", "weight": 0.5}],
}
SPEC = {
    "base": BASE,
    "x": {"name": "lora:watercolor", "values": [0.2, 0.6, 1.0]},
    "y": {"name": "seed", "count": 4},
    "z": {"name": "prompt", "values": ["a lighthouse", "a red boat"]},
}


def test_a_sweep_expands_into_tagged_jobs():
    jobs, layout = expand(SweepSpec.model_validate(SPEC), cap=100)
    assert len(jobs) == 24
    assert layout == [
        {"axis": "lora:watercolor", "labels": ["0.2", "0.6", "1"]},
        {"axis": "seed", "labels": ["100", "101", "102", "103"]},
        {"axis": "prompt", "labels": ["a lighthouse", "a red boat"]},
    ]
    last = jobs[-1]
    assert last["loras"] == [{"name": "ink-sketch", "weight": 0.5}, {"name": "watercolor", "weight": 1.0}]
    assert last["seed"] == 103 and last["prompt"] == "a red boat"
    assert last["tags"]["sweep.x"] == "1" and last["tags"]["sweep.y.index"] == "3"
    epochs = expand(
        SweepSpec.model_validate(
            {"base": BASE, "x": {"name": "lora", "values": ["watercolor", "texture-locon"], "weight": 0.8}}
        ),
        cap=10,
    )[0]
    assert [j["loras"][-1] for j in epochs] == [
        {"name": "watercolor", "weight": 0.8},
        {"name": "texture-locon", "weight": 0.8},
    ]
    te = expand(
        SweepSpec.model_validate({"base": BASE, "x": {"name": "lora:ink-sketch:te", "values": [0, 1]}}), 10
    )[0]
    assert [j["loras"][0] for j in te] == [
        {"name": "ink-sketch", "weight": 0.5, "text_encoder_weight": 0},
        {"name": "ink-sketch", "weight": 0.5, "text_encoder_weight": 1},
    ]


def test_a_sweep_over_the_cap_or_with_a_bad_axis_is_refused_and_queues_nothing(settings):
    with TestClient(create_app(settings.model_copy(update={"max_jobs_per_submit": 10}))) as api:
        call = {"headers": {"Content-Type": "application/json"}}
        too_big = api.post("/v1/sweeps", json=SPEC, **call)
        assert too_big.status_code == 422 and "makes 24 jobs" in too_big.text
        bad = api.post("/v1/sweeps", json=SPEC | {"x": {"name": "colour", "values": [1]}}, **call)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"].startswith("sweep.x")
        one_bad_job = SPEC | {"x": {"name": "steps", "values": [2, 999]}, "y": None, "z": None}
        refused = api.post("/v1/sweeps", json=one_bad_job, **call)
        assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "jobs[1].steps"
        assert api.get("/v1/jobs").json()["total"] == 0


def test_a_failed_or_cancelled_cell_is_drawn_as_such(settings):
    with Client(settings) as client:
        spec = {"base": BASE, "x": {"name": "seed", "values": [1, 2]}}
        handles = client.sweep(spec)
        make_runner(settings.model_copy(update={"max_batch": 1})).run(handles[0].job_id)
        client.cancel(handles[1].job_id)
        batch = handles[0].batch_id
        assert BatchEnds(client.jobs, open_storage(settings)).handle_due() == [batch]
        grid = Image.open(
            io.BytesIO(open_storage(settings).get(read_layout(client.redis, batch)["grids"][0]))
        )
    assert grid.size == (LABEL_WIDTH + 2 * 128, 2 * LABEL_HEIGHT + 128)  # 64-pixel images drawn at 128
    cancelled_cell = grid.getpixel((LABEL_WIDTH + 128 + 2, 2 * LABEL_HEIGHT + 2))
    assert cancelled_cell == (0xBB, 0xBB, 0xBB)  # the grey tile of a cell without an image


@pytest.mark.slow
def test_a_sweep_end_to_end_with_its_grid_and_fetch(template_home, redis_url, tmp_path):
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, redis_url)
    spec_file = tmp_path / "sweep.json"
    spec_file.write_text(json.dumps(SPEC))
    worker = WorkerProcess(env, TINY, tmp_path / "worker.log", name="sweeper@test").start()
    try:
        queued = run_cli(["sweep", str(spec_file), "--json"], env)
        assert queued.returncode == 0, queued.stdout + queued.stderr
        submitted = json.loads(queued.stdout)
        batch = submitted[0]["batch_id"]
        settings = Settings(home=home, broker_url=redis_url)
        with Client(settings) as client:
            records = client.wait([j["job_id"] for j in submitted], timeout=300)
            assert [r.status for r in records] == [JobStatus.succeeded] * 24
            # the worker's upkeep draws the grid once the last job has ended
            wait_until(lambda: read_layout(client.redis, batch)["grids"], timeout=60, what="the grid")
            grids = read_layout(client.redis, batch)["grids"]
        assert grids == [f"images/{batch}/grid-0.png", f"images/{batch}/grid-1.png"]
        with TestClient(create_app(settings.model_copy(update={"api_allowed_hosts": "testserver"}))) as api:
            view = api.get(f"/v1/batches/{batch}").json()
            assert view["sweep"][0]["axis"] == "lora:watercolor" and len(view["grids"]) == 2
            page = api.get(view["grids"][1])
            assert page.status_code == 200
            assert Image.open(io.BytesIO(page.content)).size == (
                LABEL_WIDTH + 3 * 128,
                2 * LABEL_HEIGHT + 4 * 128,
            )

        out = tmp_path / "fetched"
        fetched = run_cli(["fetch", batch, "--out", str(out)], env)
        assert fetched.returncode == 0 and "26 files fetched, 0 already there" in fetched.stdout, (
            fetched.stdout
        )
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(manifest) == 24 and (out / "grid-1.png").is_file()
        first = manifest[0]
        assert (out / first["path"]).is_file() and first["axes"]["sweep.x"] == "0.2"
        assert first["parameters"]["loras"][-1]["name"] == "watercolor"
        again = run_cli(["fetch", batch, "--out", str(out)], env)
        assert "2 files fetched, 24 already there" in again.stdout  # images with the right hash stay
    finally:
        worker.kill()


@pytest.mark.slow
def test_a_lora_over_a_folder_of_photos_and_two_strengths_is_one_batch_with_its_grid(
    template_home, redis_url, tmp_path
):
    """The issue's user: "this LoRA over my product photos", as a sweep file naming the folder."""
    import numpy as np
    import yaml

    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, redis_url)
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(6):
        pixels = np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"product-{n}.png")
    (photos / "notes.txt").write_text("not an image: left out")
    spec = {
        "base": {
            "model": TINY,
            "prompt": "a product photo, watercolor",
            "seed": 7,
            "steps": 4,
            "loras": [{"name": "watercolor", "weight": 0.8}],
        },
        "x": {"name": "init_image", "values": ["photos"]},
        "y": {"name": "strength", "values": [0.4, 0.8]},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    worker = WorkerProcess(env, TINY, tmp_path / "worker.log", name="photos@test").start()
    try:
        queued = run_cli(["sweep", str(tmp_path / "sweep.yaml"), "--json"], env)
        assert queued.returncode == 0, queued.stdout + queued.stderr
        submitted = json.loads(queued.stdout)
        assert len(submitted) == 12 and len({j["batch_id"] for j in submitted}) == 1
        batch = submitted[0]["batch_id"]
        with Client(Settings(home=home, broker_url=redis_url)) as client:
            records = client.wait([j["job_id"] for j in submitted], timeout=300)
            assert [r.status for r in records] == [JobStatus.succeeded] * 12
            assert len({r.job.init_image for r in records}) == 6
            assert sorted({r.job.strength for r in records}) == [0.4, 0.8]
            wait_until(lambda: read_layout(client.redis, batch)["grids"], timeout=60, what="the grid")
            layout = read_layout(client.redis, batch)
        assert layout["axes"][0]["labels"] == [f"product-{n}.png" for n in range(6)]
        grid = Image.open(io.BytesIO(open_storage(Settings(home=home)).get(layout["grids"][0])))
        assert grid.size == (LABEL_WIDTH + 6 * 128, 2 * LABEL_HEIGHT + 2 * 128)  # title, labels, 2 rows
    finally:
        worker.kill()


def test_a_sweep_file_read_by_a_relative_path_finds_its_images_and_uploads_its_maps(
    settings, monkeypatch, tmp_path
):
    import numpy as np
    import yaml

    from lorafleet.common.catalog.input_images import image_ref
    from lorafleet.producer.cli.sweeps import _read_spec

    monkeypatch.setenv("LORAFLEET_HOME", str(settings.home))
    monkeypatch.setenv("LORAFLEET_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("LORAFLEET_STORAGE_URL", settings.storage_url)
    (tmp_path / "sw" / "photos").mkdir(parents=True)
    data = {}
    for n in range(2):
        Image.fromarray(np.full((64, 64, 3), 40 * n, np.uint8)).save(tmp_path / "sw" / "photos" / f"p{n}.png")
        data[n] = (tmp_path / "sw" / "photos" / f"p{n}.png").read_bytes()
    spec = {
        "base": {"model": TINY, "prompt": "x", "controlnets": [{"model": "c", "image": "photos/p1.png"}]},
        "x": {"name": "init_image", "values": ["photos"]},
    }
    (tmp_path / "sw" / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    read = _read_spec(Path("sw/spec.yaml"))
    assert read["x"]["values"] == [image_ref(data[0]), image_ref(data[1])] and read["x"]["labels"] == [
        "p0.png",
        "p1.png",
    ]
    assert read["base"]["controlnets"][0]["image"] == image_ref(data[1])
