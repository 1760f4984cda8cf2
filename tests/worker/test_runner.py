"""One job end to end on a real Redis and real storage, through the runner (no Celery here)."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import pytest
import torch
from PIL import Image

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.samplers import Sampler, a1111_fields
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.worker.conftest import assert_same, snapshot

JOB = {"model": TINY, "prompt": "a lighthouse at night", "seed": 1234, "steps": 4}
"""A job as the worker tests run it: 4 steps (not the default 25) show every behaviour tested
here on the tiny model at a sixth of the sampling; a test that needs a long run asks for one."""


@pytest.fixture
def client(settings):
    with Client(settings) as c:
        yield c


def run(client, runner, **fields):
    handle = client.submit(JOB | fields)
    runner.run(handle.job_id)
    return client.get(handle.job_id)


def write_changed_copy(home, name: str, change) -> None:
    """The demo watercolor LoRA with ``change`` applied to its tensors, dropped in as ``name``."""
    from safetensors.torch import load_file, save_file

    folder = home / "autoimport" / "lora"
    state = load_file(str(folder / "watercolor.safetensors"))
    change(state)
    save_file(state, str(folder / f"{name}.safetensors"), metadata={"ss_base_model_version": "sd_v1"})


def blocked_store(tmp_path):
    """A local store whose root is a file: every upload fails as a store outage does."""
    from lorafleet.common.infra.storage import LocalStorage

    blocked = tmp_path / "store-is-a-file"
    blocked.write_text("no folder can be made under a file")
    return LocalStorage(blocked)


def pixels(record, runner) -> bytes:
    data = runner.storage.get(record.images[0].key)
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_a_job_with_a_lora_stack_ends_succeeded_with_its_png(client, runner):
    record = run(
        client,
        runner,
        loras=[{"name": "watercolor", "weight": 0.8}, {"name": "lcm-lora-sd15", "weight": 0.35}],
        sampler="lcm",
        steps=4,
        cfg_scale=1,
        num_images=2,
    )
    assert record.status is JobStatus.succeeded, record.error
    assert record.progress.step == record.progress.total == 8
    assert [i.key for i in record.images] == [
        f"images/{record.job.batch_id}/{record.job_id}/0.png",
        f"images/{record.job.batch_id}/{record.job_id}/1.png",
    ]
    assert [i.seed for i in record.images] == [1234, 1235]
    data = runner.storage.get(record.images[0].key)
    assert hashlib.sha256(data).hexdigest() == record.images[0].sha256 and len(data) == record.images[0].size
    text = Image.open(io.BytesIO(data)).text["parameters"]
    assert "<lora:watercolor:0.8> <lora:lcm-lora-sd15:0.35>" in text
    assert "Steps: 4, Sampler: LCM, CFG scale: 1, Seed: 1234, Size: 64x64, Model: tiny-sd15" in text
    assert 'Lora hashes: "watercolor: ' in text
    timings = record.timings
    for phase in (
        "queue_wait",
        "pipeline_load",
        "lora_load",
        "lora_apply",
        "sampling",
        "restore",
        "upload",
        "total",
    ):
        assert getattr(timings, phase) is not None, phase
    assert record.worker == "test-worker" and record.attempts == 1


@pytest.mark.parametrize("sampler", [s.value for s in Sampler])
def test_every_sampler_runs_and_writes_its_a1111_name(client, runner, sampler):
    record = run(client, runner, sampler=sampler, steps=3)
    assert record.status is JobStatus.succeeded, record.error
    text = Image.open(io.BytesIO(runner.storage.get(record.images[0].key))).text["parameters"]
    fields = ", ".join(f"{key}: {value}" for key, value in a1111_fields(record.job.sampler))
    assert f", {fields}, CFG scale:" in text


def test_the_same_job_after_any_other_job_gives_identical_pixels(client, runner):
    first = pixels(run(client, runner), runner)
    heavy = run(
        client,
        runner,
        loras=[{"name": "texture-locon", "weight": 1.5}, {"name": "ink-sketch", "weight": -1}],
        sampler="dpmpp_2m_karras",
        seed=99,
    )
    assert heavy.status is JobStatus.succeeded
    assert pixels(heavy, runner) != first
    assert pixels(run(client, runner), runner) == first
    hot = runner.pipelines.loaded()[0]
    assert hot.patcher.is_pristine


def test_loras_change_the_picture_and_cache_hits_are_counted(client, runner):
    plain = pixels(run(client, runner), runner)
    styled = run(client, runner, loras=[{"name": "watercolor", "weight": 1.0}])
    assert pixels(styled, runner) != plain
    again = run(client, runner, loras=[{"name": "watercolor", "weight": 1.0}])
    assert pixels(again, runner) == pixels(styled, runner)
    assert (runner.stats.lora_misses, runner.stats.lora_hits) == (1, 1)
    assert (styled.timings.lora_misses, styled.timings.lora_hits) == (1, 0)
    assert (again.timings.lora_misses, again.timings.lora_hits) == (0, 1)
    assert runner.stats.done == 3


def test_cancel_while_running_stops_at_the_next_step(client, runner):
    handle = client.submit(JOB | {"steps": 150, "width": 256, "height": 256, "num_images": 4})
    thread = threading.Thread(target=runner.run, args=(handle.job_id,))
    thread.start()
    deadline = time.monotonic() + 60
    while client.get(handle.job_id).progress.step < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.cancel(handle.job_id)
    thread.join(60)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.cancelled
    assert record.progress.step < record.progress.total
    assert (
        record.images == []
        and runner.storage.exists(f"images/{handle.batch_id}/{handle.job_id}/0.png") is False
    )


def test_a_job_cancelled_before_it_runs_never_runs(client, runner):
    handle = client.submit(JOB)
    client.cancel(handle.job_id)
    assert runner.run(handle.job_id) is JobStatus.cancelled
    record = client.get(handle.job_id)
    assert record.attempts == 0 and record.started_at is None


def test_a_corrupt_lora_fails_the_job_and_leaves_the_weights_pristine(client, runner, home):
    warm = run(client, runner)  # load the pipeline
    hot = runner.pipelines.loaded()[0]
    before = snapshot(hot)

    def poison(state):
        state[sorted(k for k in state if k.endswith("lora_up.weight"))[-1]][0, 0] = float("nan")

    write_changed_copy(home, "poisoned", poison)
    record = run(client, runner, loras=[{"name": "watercolor"}, {"name": "poisoned"}])
    assert record.status is JobStatus.failed
    assert "LoRA 'poisoned' is refused" in record.error and "NaN" in record.error
    assert_same(hot, before)
    assert pixels(run(client, runner), runner) == pixels(warm, runner)


def test_a_lora_replaced_after_submit_fails_the_job_saying_so(client, runner, home):
    handle = client.submit(JOB | {"loras": [{"name": "watercolor"}]})
    folder = home / "autoimport" / "lora"
    (folder / "watercolor.safetensors").write_bytes((folder / "ink-sketch.safetensors").read_bytes())
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.failed and "the file was replaced" in record.error


def test_unmatched_keys_are_named_in_the_warnings(client, runner, home):
    def add_unknown_layer(state):
        state["lora_unet_made_up_block_to_q.lora_down.weight"] = torch.zeros(4, 32, dtype=torch.float16)
        state["lora_unet_made_up_block_to_q.lora_up.weight"] = torch.zeros(32, 4, dtype=torch.float16)

    write_changed_copy(home, "extra-keys", add_unknown_layer)
    record = run(client, runner, loras=[{"name": "extra-keys"}])
    assert record.status is JobStatus.succeeded
    assert any("2 keys match no layer" in w and "lora_unet_made_up_block_to_q" in w for w in record.warnings)


def test_a_finished_job_delivered_again_is_skipped(client, runner):
    record = run(client, runner)
    assert runner.run(record.job_id) is JobStatus.succeeded
    assert client.get(record.job_id).attempts == 1


def test_a_job_whose_workers_were_lost_too_often_ends_failed_saying_so(client, runner):
    handle = client.submit(JOB)

    def lost(record):  # as if runner.settings.job_attempts workers had died running it
        record.status, record.attempts = JobStatus.running, runner.settings.job_attempts
        return record

    client.lifecycle.change(handle.job_id, lost)
    assert runner.run(handle.job_id) is JobStatus.failed
    record = client.get(handle.job_id)
    assert record.error.startswith(
        f"started {runner.settings.job_attempts} times without finishing (the worker running it was lost"
    )
    assert record.finished_at is not None and record.images == []


@pytest.fixture
def xl_settings(settings, home):
    """The same home, with the SDXL demo LoRAs in the drop folder."""
    lora_dir = home / "autoimport" / "lora"
    lora_dir.rename(home / "autoimport" / "lora-sd15")
    (home / "xl-loras").rename(lora_dir)
    return settings


def test_an_sdxl_job_patches_the_unet_and_both_text_encoders(xl_settings, runner):
    with Client(xl_settings) as client:
        handle = client.submit(
            {
                "model": "tiny-sdxl",
                "prompt": "a castle",
                "seed": 5,
                "loras": [{"name": "watercolor", "weight": 0.9}, {"name": "ink-sketch", "weight": 0.5}],
            }
        )
        runner.run(handle.job_id)
        record = client.get(handle.job_id)
        assert record.status is JobStatus.succeeded, record.error
        hot = next(h for h in runner.pipelines.loaded() if h.model.key == "tiny-sdxl")
        watercolor = runner.loras.stack("tiny-sdxl", hot.patcher, record.job.loras[:1]).entries[0].lora
        assert {d.target.component for d in watercolor.deltas} == {"unet", "text_encoder", "text_encoder_2"}
        plain = client.submit({"model": "tiny-sdxl", "prompt": "a castle", "seed": 5})
        runner.run(plain.job_id)
        assert pixels(client.get(plain.job_id), runner) != pixels(record, runner)
        assert hot.patcher.is_pristine


def test_a_lora_whose_shapes_do_not_fit_fails_at_the_worker_with_weights_pristine(client, runner, home):
    warm = run(client, runner)
    hot = runner.pipelines.loaded()[0]
    before = snapshot(hot)

    def misfit(state):
        key = next(k for k in sorted(state) if k.endswith("attn1_to_q.lora_down.weight"))
        state[key] = torch.zeros(4, 48, dtype=torch.float16)  # the layer reads 32 features, not 48

    write_changed_copy(home, "misfit", misfit)
    record = run(client, runner, loras=[{"name": "ink-sketch"}, {"name": "misfit"}])
    assert record.status is JobStatus.failed
    assert "LoRA 'misfit' is refused" in record.error and "the layer's weight is (32, 32)" in record.error
    assert_same(hot, before)
    assert pixels(run(client, runner), runner) == pixels(warm, runner)


def test_a_store_outage_queues_the_job_again_and_the_next_run_succeeds(client, runner, tmp_path):
    good = runner.storage
    runner.storage = blocked_store(tmp_path)
    runner.settings = runner.settings.model_copy(update={"upload_attempts": 1})
    try:
        handle = client.submit(JOB)
        assert runner.run(handle.job_id) is JobStatus.queued
        record = client.get(handle.job_id)
        assert record.status is JobStatus.queued and record.attempts == 1 and record.error is None
        assert "run 1 of at most 3 met a transient failure" in record.warnings[-1]
        assert runner.requeue_delay > 0
        runner.storage = good  # the store is back when the task sends the job again
        assert runner.run(handle.job_id) is JobStatus.succeeded
        record = client.get(handle.job_id)
        assert record.attempts == 2 and len(record.images) == 1
    finally:
        runner.storage = good


def test_a_store_that_stays_down_fails_the_job_after_job_attempts_runs(client, runner, tmp_path):
    good = runner.storage
    runner.storage = blocked_store(tmp_path)
    runner.settings = runner.settings.model_copy(update={"upload_attempts": 1, "job_attempts": 2})
    try:
        handle = client.submit(JOB)
        assert runner.run(handle.job_id) is JobStatus.queued
        assert runner.run(handle.job_id) is JobStatus.failed
        record = client.get(handle.job_id)
        assert record.error.endswith("(after 2 runs)") and "cannot write" in record.error
    finally:
        runner.storage = good


def test_a_job_cancelled_while_its_upload_waits_ends_cancelled_not_queued_again(client, runner, tmp_path):
    from lorafleet.common.infra.storage import LocalStorage
    from tests.helpers import wait_until

    good = runner.storage
    blocked = tmp_path / "store-is-a-file"
    blocked.write_text("no folder can be made under a file")
    runner.storage = LocalStorage(blocked)
    runner.settings = runner.settings.model_copy(update={"upload_attempts": 3})  # retries wait 1 s, then 2 s
    try:
        handle = client.submit(JOB | {"steps": 2})
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(runner.run(handle.job_id)))
        thread.start()
        wait_until(lambda: client.get(handle.job_id).progress.step == 2, what="sampling to end")
        client.cancel(handle.job_id)  # while the upload is being retried
        thread.join(30)
        assert outcome == [JobStatus.cancelled]
        record = client.get(handle.job_id)
        assert record.status is JobStatus.cancelled and "transient failure" in record.error
    finally:
        runner.storage = good


def test_a_job_for_a_model_the_worker_does_not_serve_fails_saying_so(client, runner):
    runner.served = frozenset({"some-other-model"})
    record = run(client, runner)
    assert record.status is JobStatus.failed
    assert "serves some-other-model, not 'tiny-sd15'" in record.error


def test_the_restore_is_in_the_record_even_when_the_upload_ends_first(client, runner, monkeypatch):
    """The store stage ends a job in its own thread; a restore slower than the upload (a
    loaded machine) must still be in the job's timings, never raced past (found by CI)."""
    from lorafleet.worker.lora.patcher import WeightPatcher

    restore = WeightPatcher.restore

    def slow_restore(self):
        time.sleep(0.5)
        return restore(self)

    monkeypatch.setattr(WeightPatcher, "restore", slow_restore)
    record = run(client, runner, loras=[{"name": "watercolor", "weight": 0.8}])
    assert record.status is JobStatus.succeeded, record.error
    assert record.timings.restore is not None
    assert record.timings.total >= 0.5  # it ended after the restore
    assert runner.pipelines.get(runner.models.get(TINY))[0].patcher.is_pristine
