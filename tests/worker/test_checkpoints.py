"""Single-file checkpoints on a worker: written from the tiny pipelines with lorafleet's own
converter, loaded with diffusers' single-file support, and run like any model."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch
from PIL import Image

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.family import Family
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from lorafleet.worker.checkpoint_format import write_single_file
from lorafleet.worker.pipelines import PipelineCache, converted_folder, load_pipeline
from tests.conftest import TINY, TINY_SD2, TINY_XL
from tests.worker.conftest import make_runner


@pytest.mark.parametrize(
    "name, family", [(TINY, Family.sd15), (TINY_SD2, Family.sd2), (TINY_XL, Family.sdxl)]
)
def test_a_checkpoint_written_from_a_pipeline_loads_back_weight_by_weight(settings, tmp_path, name, family):
    folder = settings.models_dir / name
    path = write_single_file(folder, tmp_path / f"{name}.safetensors", family.value)
    settings = settings.model_copy(update={"checkpoint_configs": {family.value: str(folder)}})
    model = ModelRegistry(settings).get(str(path))
    assert model.single_file and model.family is family and model.config == str(folder)
    original = load_pipeline(ModelRegistry(settings).get(name), torch.device("cpu"), torch.float32)
    loaded = load_pipeline(model, torch.device("cpu"), torch.float32)
    assert loaded.model_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours = getattr(original.pipe, component, None)
        if ours is None:
            continue
        theirs = getattr(loaded.pipe, component).state_dict()
        mine = ours.state_dict()
        assert set(mine) == set(theirs), component
        different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert not different, f"{component}: {len(different)} tensors differ, e.g. {different[:3]}"
    prediction = "v_prediction" if family is Family.sd2 else "epsilon"
    assert loaded.scheduler_config["prediction_type"] == prediction


def _pixels(runner, record) -> bytes:
    return Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).convert("RGB").tobytes()


def test_a_job_on_a_dropped_checkpoint_gives_the_folders_pixels_and_names_its_hash(settings):
    folder = settings.models_dir / TINY
    path = write_single_file(folder, settings.checkpoints_dir / "tiny_civitai_v1.safetensors", "sd15")
    settings = settings.model_copy(update={"checkpoint_configs": {"sd15": str(folder)}})
    runner = make_runner(settings)
    job = {"prompt": "a lighthouse", "seed": 7, "steps": 3, "loras": [{"name": "watercolor", "weight": 0.8}]}
    with Client(settings) as client:
        on_folder = client.submit(job | {"model": TINY})
        on_file = client.submit(job | {"model": "tiny_civitai_v1"})
        assert runner.run(on_folder.job_id) is JobStatus.succeeded
        assert runner.run(on_file.job_id) is JobStatus.succeeded
        folder_record, file_record = client.get(on_folder.job_id), client.get(on_file.job_id)
    assert _pixels(runner, folder_record) == _pixels(runner, file_record)
    png = Image.open(io.BytesIO(runner.storage.get(file_record.images[0].key)))
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {short}, Model: tiny_civitai_v1" in png.text["parameters"]
    model = ModelRegistry(settings).get("tiny_civitai_v1")
    assert (converted_folder(model, torch.float32, settings.converted_dir) / "model_index.json").is_file()


def loaded_once(settings, name: str):
    """A tiny checkpoint dropped as ``name``, loaded once: (settings, model, pipeline, converted copy)."""
    folder = settings.models_dir / TINY
    write_single_file(folder, settings.checkpoints_dir / f"{name}.safetensors", "sd15")
    settings = settings.model_copy(update={"checkpoint_configs": {"sd15": str(folder)}})
    model = ModelRegistry(settings).get(name)
    first, _ = PipelineCache(settings).get(model)
    return settings, model, first, converted_folder(model, torch.float32, settings.converted_dir)


def test_the_second_load_of_a_checkpoint_is_a_folder_load_of_its_converted_copy(settings):
    import json

    settings, model, first, copy = loaded_once(settings, "again")
    note = json.loads((copy / "lorafleet.json").read_text())
    assert note["model_hash"] == first.model_hash
    (copy / "lorafleet.json").write_text(json.dumps(note | {"model_hash": "from-copy"}))
    second, _ = PipelineCache(settings).get(model)
    assert second.model_hash == "from-copy"  # read from the copy, not from the checkpoint


def test_a_damaged_converted_copy_is_converted_again(settings):
    settings, model, first, copy = loaded_once(settings, "damaged")
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    second, _ = PipelineCache(settings).get(model)
    assert second.model_hash == first.model_hash
    assert (copy / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 64  # rebuilt


def test_a_copy_left_half_written_by_a_dead_worker_is_swept(settings):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = settings.converted_dir / f".abc123.{dead.pid}"
    mine = settings.converted_dir / f".def456.{os.getpid()}"
    partial.mkdir(parents=True)
    mine.mkdir()
    PipelineCache(settings)
    assert not partial.exists() and mine.exists()
