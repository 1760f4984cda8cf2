"""The SDK against a real Redis: what is queued, what is refused, and what never arrives."""

from __future__ import annotations

import base64
import json
import time

import pytest

from lorafleet.common.fleet.workers import WorkerBeat, WorkerRegistry
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.producer import Client
from tests.conftest import TINY, TINY_XL
from tests.helpers import beat_aged

JOB = {"model": TINY, "prompt": "a lighthouse"}
MODELS = "tiny-sd15, tiny-sd2, tiny-sdxl"
"""The models of the test home, as a refusal lists them."""


@pytest.fixture
def client(settings):
    with Client(settings) as c:
        yield c


def queued_messages(client, model=TINY) -> list[dict]:
    messages = []
    for key in keys.priority_lists(keys.queue(model)):
        messages += [json.loads(raw) for raw in client.redis.lrange(key, 0, -1)]
    return messages


def test_submit_writes_a_queued_record_and_one_message(client):
    handle = client.submit(JOB | {"loras": [{"name": "watercolor", "weight": 0.8}]})
    record = client.get(handle.job_id)
    assert record.status is JobStatus.queued
    assert record.queue == "lorafleet.model.tiny-sd15"
    assert record.job.loras[0].sha256 and record.job.seed is not None
    assert (record.job.width, record.job.height) == (64, 64)  # the model's native size
    messages = queued_messages(client)
    assert [m["headers"]["id"] for m in messages] == [handle.job_id]
    assert messages[0]["headers"]["task"] == "lorafleet.generate"
    assert messages[0]["content-type"] == "application/json"
    # the body carries the record as queued (the start's hint); the header that Flower and the
    # task events show says so in a line, rather than a second copy cut at 1024 characters
    body_kwargs = json.loads(base64.b64decode(messages[0]["body"]))[1]
    assert json.loads(body_kwargs["queued"])["job"]["job_id"] == handle.job_id
    kwargsrepr = messages[0]["headers"]["kwargsrepr"]
    assert handle.job_id in kwargsrepr and "prompt" not in kwargsrepr and len(kwargsrepr) < 160


def test_priorities_land_in_celerys_priority_lists(client):
    client.submit(JOB | {"priority": "low"})
    client.submit(JOB | {"priority": "high"})
    queue = keys.queue(TINY)
    assert client.redis.llen(queue) == 1  # high: priority 0, the bare list
    assert client.redis.llen(f"{queue}{keys.PRIORITY_SEPARATOR}6") == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"width": 100}, "width"),
        ({"model": "no-such-model"}, "model"),
        ({"loras": [{"name": "no-such-lora"}]}, "loras[0].name"),
        ({"model": TINY_XL, "loras": [{"name": "watercolor"}]}, "loras[0].name"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_refused_job_never_reaches_the_queue(client, change, field):
    with pytest.raises(JobRejected) as caught:
        client.submit(JOB | change)
    assert caught.value.field == field
    assert queued_messages(client) == [] and queued_messages(client, TINY_XL) == []
    assert client.redis.keys("lorafleet:job:*") == []


def test_family_mismatch_says_which_family_is_needed(client):
    with pytest.raises(JobRejected, match="for sd15 but model 'tiny-sdxl' is sdxl"):
        client.submit(JOB | {"model": TINY_XL, "loras": [{"name": "watercolor"}]})


def test_shape_mismatch_is_refused_when_metadata_is_silent(client, home):
    # ink-sketch (PEFT) carries no family metadata; its cross-attention width gives it away.
    (home / "autoimport" / "lora" / "xl-ink.safetensors").write_bytes(
        (home / "xl-loras" / "ink-sketch.safetensors").read_bytes()
    )
    with pytest.raises(JobRejected, match="text embedding 80 wide but model 'tiny-sd15' uses 32"):
        client.submit(JOB | {"loras": [{"name": "xl-ink"}]})


def test_submit_many_is_all_or_nothing(client):
    jobs = [JOB, JOB | {"steps": 0}, JOB | {"loras": [{"name": "missing"}]}]
    with pytest.raises(JobRejected) as caught:
        client.submit_many(jobs)
    assert [f for f, _ in caught.value.problems] == ["jobs[1].steps", "jobs[2].loras[0].name"]
    assert queued_messages(client) == []
    handles = client.submit_many([JOB, JOB | {"seed": 5}])
    assert len({h.batch_id for h in handles}) == 1
    assert [r.job_id for r in client.batch(handles[0].batch_id)] == [h.job_id for h in handles]
    assert len(queued_messages(client)) == 2


def test_default_weights_follow_invokeais_lora_guidance(client):
    alone = client.submit(JOB | {"loras": [{"name": "watercolor"}]}).job
    assert alone.loras[0].weight == 0.75
    beside = client.submit(JOB | {"loras": [{"name": "watercolor"}, {"name": "lcm-lora-sd15"}]}).job
    assert [spec.weight for spec in beside.loras] == [0.45, 0.35]
    explicit = client.submit(
        JOB | {"loras": [{"name": "watercolor", "weight": 1.0}, {"name": "lcm-lora-sd15"}]}
    ).job
    assert [spec.weight for spec in explicit.loras] == [1.0, 0.35]


def test_lcm_adds_the_familys_lcm_lora_at_035(client):
    job = client.submit(JOB | {"lcm": True, "loras": [{"name": "watercolor"}]}).job
    assert (job.sampler.value, job.steps, job.cfg_scale) == ("lcm", 4, 1.0)
    assert [(s.name, s.weight) for s in job.loras] == [("watercolor", 0.45), ("lcm-lora-sd15", 0.35)]


def test_lcm_without_an_lcm_lora_for_the_family_is_refused(client, home):
    (home / "autoimport" / "lora" / "lcm-lora-sd15.safetensors").unlink()
    with pytest.raises(JobRejected) as caught:
        client.submit(JOB | {"lcm": True})
    assert caught.value.field == "lcm"


def test_inject_trigger_appends_the_files_trigger_words(client):
    job = client.submit(JOB | {"loras": [{"name": "watercolor", "inject_trigger": True}]}).job
    assert job.prompt == "a lighthouse, watercolor"
    handle = client.submit(JOB | {"loras": [{"name": "ink-sketch", "inject_trigger": True}]})
    assert handle.job.prompt == "a lighthouse"
    assert any("no trigger words" in w for w in handle.warnings)


def test_lcm_warnings_reach_the_record(client):
    handle = client.submit(JOB | {"sampler": "lcm", "steps": 20})
    assert any("steps=20" in w for w in client.get(handle.job_id).warnings)


def test_a_model_folder_outside_the_registry_has_its_own_queue(settings, home):
    client = Client(settings.model_copy(update={"allow_model_paths": True}))
    handle = client.submit(JOB | {"model": str(home / "models" / TINY_XL)})
    assert client.get(handle.job_id).queue == "lorafleet.model.tiny-sdxl"  # inside models/: its name
    elsewhere = home / "elsewhere"
    (home / "models" / TINY).rename(elsewhere)
    record = client.get(client.submit(JOB | {"model": str(elsewhere)}).job_id)
    assert record.queue == keys.queue(str(elsewhere)) and record.job.model == str(elsewhere)


def test_a_taken_job_id_is_refused(client):
    client.submit(JOB | {"job_id": "fixed-1"})
    with pytest.raises(JobRejected, match="already taken"):
        client.submit(JOB | {"job_id": "fixed-1"})
    assert len(queued_messages(client)) == 1


def test_cancel_of_a_queued_job_ends_it(client):
    handle = client.submit(JOB)
    record = client.cancel(handle.job_id)
    assert record.status is JobStatus.cancelled and record.finished_at is not None
    assert client.cancel(handle.job_id).status is JobStatus.cancelled
    assert client.wait([handle.job_id], timeout=1)[0].status is JobStatus.cancelled


def test_wait_times_out_saying_how_many_are_left(client):
    handles = client.submit_many([JOB, JOB])
    with pytest.raises(TimeoutError, match="2 of 2 jobs still unfinished"):
        client.wait([h.job_id for h in handles], timeout=0.3)


def test_unknown_job_id_is_a_clear_error(client):
    with pytest.raises(JobRejected, match="no job 'nope'"):
        client.get("nope")


def test_the_registered_lcm_lora_wins_and_counts_as_lcm(settings, home):
    folder = home / "autoimport" / "lora"
    (folder / "turbo-distill.safetensors").write_bytes((folder / "lcm-lora-sd15.safetensors").read_bytes())
    registered = settings.model_copy(update={"lcm_loras": {"sd15": "turbo-distill"}})
    with Client(registered) as client:
        job = client.submit(JOB | {"lcm": True, "loras": [{"name": "watercolor"}]}).job
        assert [(s.name, s.weight) for s in job.loras] == [("watercolor", 0.45), ("turbo-distill", 0.35)]
        explicit = client.submit(JOB | {"loras": [{"name": "turbo-distill"}, {"name": "ink-sketch"}]}).job
        assert [s.weight for s in explicit.loras] == [0.35, 0.45]


def test_several_unregistered_lcm_loras_warn_which_was_used(client, home):
    folder = home / "autoimport" / "lora"
    (folder / "lcm-other.safetensors").write_bytes((folder / "lcm-lora-sd15.safetensors").read_bytes())
    handle = client.submit(JOB | {"lcm": True})
    assert handle.job.loras[0].name == "lcm-lora-sd15"
    assert any("several LCM-LoRAs" in w and "LORAFLEET_LCM_LORAS" in w for w in handle.warnings)


def beat(client, model: str, age: float = 1.0) -> None:
    now = time.time()
    beat_aged(
        WorkerRegistry(client.redis),
        WorkerBeat(
            name=f"w@{model}",
            host="h",
            pid=1,
            version="t",
            device="cpu",
            models=[model],
            queues=[keys.queue(model)],
            started_at=now - 60,
            last_seen=now - age,
        ),
    )


def test_a_model_no_live_worker_serves_is_queued_with_a_warning(client):
    beat(client, TINY_XL)
    beat(client, TINY, age=30)  # stale: it does not count
    handle = client.submit(JOB)
    assert any("no live worker serves 'tiny-sd15'" in w for w in handle.warnings)
    assert client.get(handle.job_id).warnings == handle.warnings
    assert len(queued_messages(client)) == 1


def test_require_worker_refuses_the_whole_batch_and_queues_nothing(client):
    beat(client, TINY_XL)
    with pytest.raises(JobRejected) as refused:
        client.submit_many([JOB | {"model": TINY_XL}, JOB], require_worker=True)
    assert refused.value.problems == [
        (
            "jobs[1].model",
            "no live worker serves 'tiny-sd15'; start one with: lorafleet worker --models tiny-sd15",
        )
    ]
    assert queued_messages(client) == [] and queued_messages(client, TINY_XL) == []
    beat(client, TINY)
    served = client.submit(JOB, require_worker=True)
    assert not any("no live worker" in w for w in served.warnings)


def test_a_batch_is_sent_grouped_by_lora_stack_in_first_seen_order(client):
    a = [{"name": "watercolor", "weight": 0.8}]
    b = [{"name": "watercolor", "weight": 0.5}]
    stacks = [a, b, a, [], b, a]
    handles = client.submit_many([JOB | {"loras": s, "seed": n} for n, s in enumerate(stacks)])
    # kombu pushes on the left and workers pop from the right: the list holds the send order reversed.
    sent = [m["headers"]["id"] for m in reversed(queued_messages(client))]
    ids = [h.job_id for h in handles]
    assert sent == [ids[0], ids[2], ids[5], ids[1], ids[4], ids[3]]
    assert [r.job_id for r in client.batch(handles[0].batch_id)] == ids  # records keep submit order


@pytest.mark.parametrize(
    "model",
    ["/etc", "/etc/passwd", "/no/such/folder", "../models/tiny-sd15", "~root", "acme/some-model"],
)
def test_paths_and_unregistered_hub_ids_are_refused_alike_unless_allowed(client, model):
    with pytest.raises(JobRejected) as caught:
        client.submit(JOB | {"model": model})
    # the same words whether the path exists or not
    assert str(caught.value).startswith(
        f"model: unknown model {model!r} (allowed: a registered model ({MODELS})"
    )
    if "/" not in model or model.startswith(("/", ".")):  # a path: not a word more
        assert str(caught.value).endswith(f"({MODELS}))")
    assert caught.value.field == "model"
    assert queued_messages(client) == []


def test_an_allowed_hub_id_is_queued_under_its_own_queue(settings):
    with Client(settings.model_copy(update={"allow_hub_ids": True})) as client:
        record = client.get(
            client.submit(JOB | {"model": "acme/some-model", "width": 64, "height": 64}).job_id
        )
        assert record.job.model == "acme/some-model" and record.queue == keys.queue("acme/some-model")


def test_a_job_id_whose_images_outlived_its_record_is_refused(client, settings):
    from lorafleet.common.infra.storage import image_key, open_storage

    job = JOB | {"job_id": "reused-id", "batch_id": "batch-1"}
    open_storage(settings).put(image_key("images", "batch-1", "reused-id", 0), b"\x89PNG old", "image/png")
    with pytest.raises(JobRejected, match="'reused-id' was used before") as caught:
        client.submit(job)
    assert caught.value.field == "job_id" and queued_messages(client) == []
    assert client.submit(JOB | {"job_id": "fresh-id", "batch_id": "batch-1"}).job_id == "fresh-id"


def test_wait_ends_even_when_an_end_left_no_event(client, monkeypatch):
    """wait() reads the records it has events of, and every pending one now and then: a
    record whose event was lost (a failover drops the last writes of the stream too) still
    ends the wait."""
    import lorafleet.producer.follow as follow

    monkeypatch.setattr(follow, "RESYNC_SECONDS", 0.5)
    handle = client.submit(JOB)
    record = client.get(handle.job_id)
    record.status = JobStatus.cancelled
    client.redis.set(keys.job(handle.job_id), record.model_dump_json())  # no event for it
    (ended,) = client.wait([handle.job_id], timeout=30)  # TimeoutError if it never read it again
    assert ended.status is JobStatus.cancelled


def test_wait_reads_a_record_again_only_when_the_job_has_ended(client):
    """Without a progress display, a running job's events (its start, each progress write) are
    no reason to read its record: wait reads each record once at first and once at its end."""
    import threading

    from lorafleet.common.fleet.lifecycle import Lifecycle

    handles = client.submit_many([JOB, JOB])
    ids = [h.job_id for h in handles]
    reads: list[str] = []
    first_read = threading.Event()
    get_many = client.jobs.get_many

    def counted(job_ids):
        reads.extend(job_ids)
        first_read.set()
        return get_many(job_ids)

    client.jobs.get_many = counted
    waited: list = []
    waiter = threading.Thread(target=lambda: waited.extend(client.wait(ids, timeout=60)))
    waiter.start()
    assert first_read.wait(10)
    lifecycle = Lifecycle(client.jobs)
    runs = {}
    for job_id in ids:
        _, _, runs[job_id] = lifecycle.start(
            job_id, worker="w", instance="i", attempts_allowed=3, owner_alive=lambda r: False, lost_after=10
        )
    for step in range(1, 6):
        for job_id in ids:
            lifecycle.progress(job_id, runs[job_id], step)
            time.sleep(0.01)  # a waiter that read on news would read here
    for job_id in ids:
        lifecycle.end(job_id, JobStatus.succeeded, runs[job_id])
    waiter.join(30)
    assert [r.status for r in waited] == [JobStatus.succeeded] * 2
    assert sorted(reads) == sorted(ids * 2)
