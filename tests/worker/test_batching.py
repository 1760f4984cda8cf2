"""Batched sampling through the runner (no Celery): a job's images in one call, compatible
waiting jobs sampled with it, each job stored and ended on its own."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from lorafleet.worker.run.batching import batch_key
from tests.conftest import TINY
from tests.worker.conftest import make_runner

JOB = {"model": TINY, "prompt": "a lighthouse at night", "seed": 1234, "steps": 6}
STACK = [{"name": "watercolor", "weight": 0.8}]


@pytest.fixture
def client(settings):
    with Client(settings) as c:
        yield c


def _array(runner, record, index: int) -> np.ndarray:
    data = runner.storage.get(record.images[index].key)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_jobs_images_share_one_call_and_each_keeps_its_own_seed(client, settings):
    runner = make_runner(settings.model_copy(update={"max_batch": 4}))
    batched = client.submit(JOB | {"num_images": 4, "loras": STACK})
    runner.run(batched.job_id)
    record = client.get(batched.job_id)
    assert record.status is JobStatus.succeeded, record.error
    assert record.timings.batch_size == 4 and [i.seed for i in record.images] == [1234, 1235, 1236, 1237]
    alone = client.submit(JOB | {"seed": 1236, "loras": STACK})
    runner.run(alone.job_id)
    single = client.get(alone.job_id)
    assert single.timings.batch_size == 4  # every call has the batch size's rows: copies fill it
    # image 2 of the batch is the one-image job with seed 1236, pixel for pixel
    assert np.array_equal(_array(runner, record, 2), _array(runner, single, 0))
    assert np.abs(_array(runner, record, 1) - _array(runner, single, 0)).max() > 20  # another seed


def test_compatible_waiting_jobs_are_sampled_with_the_running_one(client, settings):
    runner = make_runner(settings.model_copy(update={"max_batch": 8}))
    lead = client.submit(JOB | {"loras": STACK})
    same = [client.submit(JOB | {"seed": s, "prompt": f"a harbour {s}", "loras": STACK}) for s in (1, 2)]
    other_stack = client.submit(JOB | {"loras": [{"name": "watercolor", "weight": 0.5}]})
    other_steps = client.submit(JOB | {"steps": 5, "loras": STACK})
    assert runner.run(lead.job_id) is JobStatus.succeeded
    for handle in (lead, *same):
        record = client.get(handle.job_id)
        assert record.status is JobStatus.succeeded and record.timings.batch_size == 8, record
        assert record.attempts == 1 and record.progress.step == record.progress.total == 6
    assert client.get(other_stack.job_id).status is JobStatus.queued  # another LoRA weight
    assert client.get(other_steps.job_id).status is JobStatus.queued  # another step count
    # their messages were taken from the queue; a late duplicate finds the record final
    assert client.redis.llen(client.get(lead.job_id).queue + "\x06\x163") == 3  # lead's + 2 others
    assert runner.run(same[0].job_id) is JobStatus.succeeded
    assert client.get(same[0].job_id).attempts == 1
    # the weights were restored: the next job alone gives the lead's pixels
    again = client.submit(JOB | {"loras": STACK})
    runner.run(again.job_id)
    first, second = client.get(lead.job_id), client.get(again.job_id)
    assert np.array_equal(_array(runner, first, 0), _array(runner, second, 0))


def test_a_job_cancelled_mid_batch_leaves_it_and_its_companions_finish(client, settings):
    runner = make_runner(settings.model_copy(update={"max_batch": 8}))
    slow = JOB | {"steps": 80, "width": 128, "height": 128}
    lead = client.submit(slow)
    doomed = client.submit(slow | {"seed": 7})
    kept = client.submit(slow | {"seed": 8})

    def cancel_once_sampling() -> None:
        while client.get(doomed.job_id).progress.step < 5:
            threading.Event().wait(0.05)
        client.cancel(doomed.job_id)

    canceller = threading.Thread(target=cancel_once_sampling, daemon=True)
    canceller.start()
    runner.run(lead.job_id)
    canceller.join(timeout=30)
    cancelled = client.get(doomed.job_id)
    assert cancelled.status is JobStatus.cancelled and cancelled.images == []
    for handle in (lead, kept):
        record = client.get(handle.job_id)
        assert record.status is JobStatus.succeeded and len(record.images) == 1, record.error
    assert not runner.storage.exists(f"images/{cancelled.job.batch_id}/{doomed.job_id}/0.png")


def test_one_jobs_failed_upload_fails_that_job_only(client, settings):
    strict = settings.model_copy(update={"max_batch": 8, "upload_attempts": 1, "job_attempts": 1})
    runner = make_runner(strict)
    lead = client.submit(JOB)
    broken = client.submit(JOB | {"seed": 5})
    record = client.get(broken.job_id)
    # a file where the job's folder must go: its uploads fail, its companions' do not
    blocker = runner.storage.root / "images" / record.job.batch_id / broken.job_id
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    runner.run(lead.job_id)
    failed = client.get(broken.job_id)
    assert failed.status is JobStatus.failed and "upload" in failed.error
    assert client.get(lead.job_id).status is JobStatus.succeeded


def test_with_max_batch_1_every_image_has_its_own_call(client, settings):
    runner = make_runner(settings.model_copy(update={"max_batch": 1}))
    lead = client.submit(JOB | {"num_images": 3})
    companion = client.submit(JOB)
    runner.run(lead.job_id)
    assert client.get(lead.job_id).timings.batch_size == 1
    assert client.get(companion.job_id).status is JobStatus.queued  # no room beside a full batch


def test_the_batch_key_holds_what_shapes_the_call_and_not_the_prompt_or_seed(client):
    from lorafleet.common.schema.jobs import parse_job

    base = parse_job(JOB | {"width": 64, "height": 64})
    assert batch_key(base) == batch_key(
        parse_job(JOB | {"width": 64, "height": 64, "seed": 9, "prompt": "x"})
    )
    for change in ({"steps": 7}, {"cfg_scale": 3}, {"sampler": "lcm"}, {"width": 128}, {"loras": STACK}):
        assert batch_key(parse_job(JOB | {"width": 64, "height": 64} | change)) != batch_key(base), change


def test_a_taken_companion_queued_again_gets_a_new_message_from_upkeep(client, settings, tmp_path):
    from lorafleet.common.schema import keys
    from tests.worker.test_runner import blocked_store

    runner = make_runner(settings.model_copy(update={"max_batch": 8, "upload_attempts": 1}))
    runner.storage = blocked_store(tmp_path)  # every upload fails as in a store outage
    lead = client.submit(JOB)
    companion = client.submit(JOB | {"seed": 5})
    client.jobs.sent([lead.job_id, companion.job_id])
    assert runner.run(lead.job_id) is JobStatus.queued  # the task sends the lead's again
    again = client.get(companion.job_id)
    assert again.status is JobStatus.queued and again.attempts == 1
    unsent = {i.decode() for i in client.redis.zrange(keys.UNSENT, 0, -1)}
    assert unsent == {companion.job_id}  # its message was taken: upkeep sends a new one


def test_the_next_waiting_jobs_loras_are_made_ready_while_a_job_samples(client, settings):
    runner = make_runner(settings)
    first = client.submit(JOB | {"loras": STACK})
    nxt = client.submit(JOB | {"loras": [{"name": "ink-sketch", "weight": 0.7}]})
    runner.run(first.job_id)
    runner._prefetch_stage.submit(lambda: None).result()  # the prefetch stage is done
    assert any(key[1] == client.get(nxt.job_id).job.loras[0].sha256 for key in runner.loras.cached())
    runner.run(nxt.job_id)
    timings = client.get(nxt.job_id).timings
    assert (timings.lora_hits, timings.lora_misses) == (1, 0)  # only the weight write was left


def test_without_background_stages_nothing_is_made_ready_ahead(client, settings):
    runner = make_runner(settings.model_copy(update={"background_stages": False}))
    first = client.submit(JOB | {"loras": STACK})
    nxt = client.submit(JOB | {"loras": [{"name": "ink-sketch", "weight": 0.7}]})
    runner.run(first.job_id)
    runner.run(nxt.job_id)
    assert client.get(nxt.job_id).timings.lora_misses == 1


def test_a_job_taken_along_but_never_started_gets_a_new_message(client, settings, monkeypatch):
    import redis

    from lorafleet.common.fleet.upkeep import send_unsent

    runner = make_runner(settings.model_copy(update={"max_batch": 8}))
    lead = client.submit(JOB)
    other = client.submit(JOB | {"seed": 5})
    client.jobs.sent([lead.job_id, other.job_id])
    started, _ = runner._take(lead.job_id)

    def redis_fails(job_id):  # Redis fails over between taking the message and starting the record
        raise redis.ConnectionError("the primary went away")

    monkeypatch.setattr(runner, "_take", redis_fails)
    with pytest.raises(redis.ConnectionError):
        runner._companions(started)
    assert other.job_id not in {w.job_id for w in runner.waiting.peek(started.queue)}  # its message is gone
    assert client.get(other.job_id).status is JobStatus.queued
    assert send_unsent(client.jobs, client.celery, after=0) == [other.job_id]  # upkeep sends a new one
    assert other.job_id in {w.job_id for w in runner.waiting.peek(started.queue)}


def test_a_jobs_pixels_and_call_rows_do_not_depend_on_its_companions(client, settings):
    """Default settings (the batch size derived from the machine): seed 5 alone and seed 5
    among 11 companions run in calls of the same rows and give the same pixels (before, the
    lone job ran in a call of 2 rows and the crowd in calls of 8, which differ on this CPU)."""
    runner = make_runner(settings)
    crowd = [client.submit(JOB | {"seed": seed, "prompt": f"a harbour {seed}"}) for seed in range(5, 17)]
    runner.run(crowd[0].job_id)
    taken = [client.get(h.job_id) for h in crowd]
    together = [r for r in taken if r.status is JobStatus.succeeded]
    assert len(together) > 1  # companions were taken along
    lone = client.submit(JOB | {"seed": 5, "prompt": "a harbour 5"})
    runner.run(lone.job_id)
    alone = client.get(lone.job_id)
    assert alone.timings.batch_size == together[0].timings.batch_size == runner.batch_sizes.rows(alone.job)
    assert np.array_equal(_array(runner, alone, 0), _array(runner, together[0], 0))


def test_a_rows_result_does_not_depend_on_what_the_other_rows_hold(hot, settings):
    """The fixed shape is the whole promise: the same rows, whatever they hold, give a row the
    same floats, bit for bit (the copies that fill a call included)."""
    from lorafleet.common.schema.jobs import GenerationJob
    from lorafleet.worker.run.sampling import conditioning, sample

    job = GenerationJob(model=TINY, prompt="a lighthouse", steps=3, width=64, height=64, cfg_scale=7)
    prompts = ["a lighthouse", "a red barn", "a forest at dawn", "a city of glass"]
    conds = [conditioning(hot.pipe, job.model_copy(update={"prompt": p})) for p in prompts]
    outputs = [
        sample(hot.pipe, hot.scheduler_config, job, conds[:n], [5, 9, 13, 21][:n], lambda s: None, 4, "np")[0]
        for n in (1, 2, 4)
    ]
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:])
    with pytest.raises(ValueError, match="do not fit a call of 2 rows"):
        sample(hot.pipe, hot.scheduler_config, job, conds[:3], [1, 2, 3], lambda s: None, 2)


def test_the_default_batch_size_stays_within_a_megapixel_a_call():
    """A lone job pays for every row of its call: big images get few rows by default."""
    import torch

    from lorafleet.worker.run.batching import default_max_batch

    cpu = torch.device("cpu")
    assert default_max_batch(cpu, 64, 64) == 4
    assert default_max_batch(cpu, 512, 512) <= 4 and default_max_batch(cpu, 1024, 1024) == 1
