"""Input images expire with the jobs that name them: kept LORAFLEET_INPUT_IMAGE_GRACE after an
upload while no job names them, as long as any kept record names them, then deleted by upkeep;
a job naming a deleted image is refused like one never uploaded. Real Redis and real storage
(a folder, and moto's S3 server); the upkeep pass is run directly, with tiny grace and
retention values."""

from __future__ import annotations

import io
import threading
import time
import uuid

import boto3
import pytest
from PIL import Image

from lorafleet.common.catalog import input_retention
from lorafleet.common.catalog.input_images import storage_key
from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.services.loop import Background
from lorafleet.producer import Client
from tests.conftest import TINY

GRACE = 1
"""Seconds of LORAFLEET_INPUT_IMAGE_GRACE in these tests."""
MARGIN = 0.3
"""Seconds waited past a deadline (Redis expires a key on its own clock, in milliseconds)."""


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (seed, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def job(ref: str) -> dict:
    return {"model": TINY, "prompt": "a lighthouse", "init_image": ref, "steps": 4}


@pytest.fixture(params=["folder", "s3"])
def fleet(request, settings):
    """Settings with a grace of GRACE s, storing in a folder or in an S3 bucket (moto's server)."""
    update: dict = {"input_image_grace": GRACE}
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_credentials").endpoint
        bucket = f"inputs-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        update |= {"storage_url": f"s3://{bucket}/run", "s3_endpoint_url": endpoint}
    return settings.model_copy(update=update)


def upkeep_pass(client: Client) -> None:
    """One upkeep pass, as the background thread of a worker or of the API runs it."""
    background = Background(client.settings, client.jobs, client.celery, open_storage(client.settings))
    try:
        assert background.upkeep.run(), "this pass held the upkeep lease"
    finally:
        background.upkeep.lease.release()


def stored(client: Client, ref: str) -> bool:
    return open_storage(client.settings).exists(storage_key(ref))


def wait_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def test_an_image_no_job_names_is_deleted_after_the_grace_period(fleet):
    with Client(fleet) as client:
        ref = client.upload_image(png(1))
        uploaded = time.monotonic()
        upkeep_pass(client)
        assert stored(client, ref), "deleted within its grace period"
        wait_until(uploaded + GRACE + MARGIN)
        upkeep_pass(client)
        assert not stored(client, ref)
        sha = ref.removeprefix("sha256:")
        assert client.redis.zscore(keys.INPUTS_DUE, sha) is None
        assert client.redis.zscore(keys.INPUTS_DELETING, sha) is None
        with pytest.raises(JobRejected, match="upload it first") as refused:
            client.submit(job(ref))
        assert refused.value.field == "init_image"
        assert client.upload_image(png(1)) == ref and stored(client, ref)  # uploaded again: back
        client.submit(job(ref))


def test_an_image_a_kept_job_names_survives(fleet):
    with Client(fleet) as client:
        ref = client.upload_image(png(2))
        handle = client.submit(job(ref))
        wait_until(time.monotonic() + GRACE + MARGIN)
        upkeep_pass(client)
        assert stored(client, ref), "deleted while a queued job names it"
        client.cancel(handle.job_id)  # ended: its record is kept a week
        upkeep_pass(client)
        assert stored(client, ref), "deleted while a kept record names it"


def test_an_image_is_deleted_once_the_record_naming_it_expires(fleet):
    short = fleet.model_copy(update={"record_retention": 1})
    with Client(short) as client:
        ref = client.upload_image(png(3))
        handle = client.submit(job(ref))  # this client now knows the image's size
        client.cancel(handle.job_id)
        ended = time.monotonic()
        wait_until(ended + max(GRACE, 1) + MARGIN)
        upkeep_pass(client)
        assert not stored(client, ref)
        assert client.redis.exists(keys.input_jobs(ref.removeprefix("sha256:"))) == 0
        with pytest.raises(JobRejected, match="upload it first"):
            client.submit(job(ref))  # refused although its size was remembered


def test_an_image_named_by_two_jobs_survives_until_the_later_ones_record_expires(fleet):
    short = fleet.model_copy(update={"record_retention": 2})
    with Client(short) as client:
        ref = client.upload_image(png(4))
        first, second = client.submit(job(ref)), client.submit(job(ref))
        client.cancel(first.job_id)
        start = time.monotonic()
        wait_until(start + 1)
        client.cancel(second.job_id)  # its record is kept a second longer
        wait_until(start + 2 + MARGIN)
        upkeep_pass(client)
        assert client.redis.exists(keys.job(first.job_id)) == 0  # the first record has expired
        assert stored(client, ref), "deleted while the later job's record is kept"
        wait_until(start + 3 + MARGIN)
        upkeep_pass(client)
        assert not stored(client, ref)


def test_a_job_waiting_past_the_grace_keeps_its_image_until_its_record_expires(fleet, monkeypatch):
    monkeypatch.setattr(input_retention, "RECHECK_SECONDS", 0.5)  # looked at again that soon
    short = fleet.model_copy(update={"record_retention": 1})
    with Client(short) as client:
        ref = client.upload_image(png(5))
        handle = client.submit(job(ref))
        wait_until(time.monotonic() + GRACE + MARGIN)
        upkeep_pass(client)
        assert stored(client, ref), "deleted while a queued job names it"
        client.cancel(handle.job_id)
        ended = time.monotonic()
        upkeep_pass(client)
        assert stored(client, ref), "deleted before the record expired"
        wait_until(ended + 1 + MARGIN)
        upkeep_pass(client)
        assert not stored(client, ref)


def test_a_batch_names_its_image_once_with_every_job(settings):
    with Client(settings) as client:
        ref = client.upload_image(png(6))
        other = client.upload_image(png(7))
        handles = client.submit_many([job(ref), job(ref), {**job(ref), "mask_image": other}])
        sha = ref.removeprefix("sha256:")
        named = {m.decode() for m in client.redis.zrange(keys.input_jobs(sha), 0, -1)}
        assert named == {h.job_id for h in handles}
        assert [
            m.decode() for m in client.redis.zrange(keys.input_jobs(other.removeprefix("sha256:")), 0, -1)
        ] == [handles[2].job_id]
        assert client.redis.zcard(keys.INPUTS_DUE) == 2


def test_an_upload_during_the_deletion_of_the_same_image_stores_it_again(settings):
    fleet = settings.model_copy(update={"input_image_grace": GRACE})
    with Client(fleet) as client:
        ref = client.upload_image(png(8))
        sha = ref.removeprefix("sha256:")
        images = client.input_images()
        wait_until(time.monotonic() + GRACE + MARGIN)
        assert images.retention.due(10) == [sha] and not images.retention.still_needed(sha)
        assert images.retention.forget(sha)  # upkeep has decided; its deletion is slow
        with pytest.raises(JobRejected, match="upload it first"):
            client.submit(job(ref))  # a job naming it meanwhile is refused

        finish = threading.Timer(0.5, images._delete, args=[sha])
        finish.start()
        try:
            assert client.upload_image(png(8)) == ref  # waits for the deletion, then stores it again
        finally:
            finish.join()
        assert stored(client, ref)
        client.submit(job(ref))


def test_a_deletion_cut_short_is_finished_by_a_later_pass(settings):
    fleet = settings.model_copy(update={"input_image_grace": GRACE})
    with Client(fleet) as client:
        ref = client.upload_image(png(9))
        sha = ref.removeprefix("sha256:")
        wait_until(time.monotonic() + GRACE + MARGIN)
        retention = client.input_images().retention
        assert not retention.still_needed(sha) and retention.forget(sha)  # then the process dies
        upkeep_pass(client)
        assert stored(client, ref)  # another process may still be deleting it
        client.redis.zadd(keys.INPUTS_DELETING, {sha: 0})  # as if DELETE_HOLD_SECONDS had passed
        upkeep_pass(client)
        assert not stored(client, ref) and client.redis.zscore(keys.INPUTS_DELETING, sha) is None
