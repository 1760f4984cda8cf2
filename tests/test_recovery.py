"""Nothing lost: real worker processes killed, a real object store taken away, memory run out.

Every submitted job must end succeeded, failed with a reason, or cancelled: never lost and
never done twice.
"""

from __future__ import annotations

import time

import boto3
import pytest

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, copy_home
from tests.helpers import (
    MotoServer,
    RedisProcess,
    TcpProxy,
    WorkerProcess,
    lorafleet_env,
    wait_until,
)

pytestmark = pytest.mark.slow

S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def fleet(template_home, tmp_path, monkeypatch):
    """A Redis, a home, an S3 server behind a proxy that can be taken down; workers on demand."""
    redis = RedisProcess(tmp_path / "redis").start()
    moto = MotoServer().start()
    proxy = TcpProxy(moto.port).up()
    for key, value in S3.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="renders")
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(
        home,
        redis.url,
        "s3://renders/fleet",
        LORAFLEET_S3_ENDPOINT_URL=proxy.endpoint,
        LORAFLEET_VISIBILITY_TIMEOUT="10",
        **S3,
    )
    settings = Settings(
        home=home,
        broker_url=redis.url,
        storage_url="s3://renders/fleet",
        s3_endpoint_url=proxy.endpoint,
        visibility_timeout=10,
    )
    workers: list[WorkerProcess] = []

    def start_worker(name: str, **extra: str) -> WorkerProcess:
        worker = WorkerProcess(env | extra, TINY, tmp_path / f"{name}.log", name=name).start()
        workers.append(worker)
        return worker

    with Client(settings) as client:
        yield {"client": client, "start_worker": start_worker, "proxy": proxy, "s3": s3, "env": env}
    for worker in workers:
        worker.kill()
    proxy.down()
    moto.stop()
    redis.stop()


def stored_keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="renders").get("Contents", []))


def test_a_worker_killed_mid_job_has_its_job_rerun_once_by_another(fleet):
    client = fleet["client"]
    first = fleet["start_worker"]("first@recovery")
    second = fleet["start_worker"]("second@recovery")
    handle = client.submit(
        {
            "model": TINY,
            "prompt": "survives a crash",
            "steps": 30,
            "width": 192,
            "height": 192,
            "num_images": 2,
            "seed": 5,
        }
    )
    running = wait_until(
        lambda: (r := client.get(handle.job_id)).progress.step >= 2 and r,
        timeout=60,
        what="the job to be sampling",
    )
    victim, survivor = (first, second) if running.worker == first.name else (second, first)
    victim.kill()
    killed_at = time.monotonic()
    record = handle.wait(timeout=300)
    assert record.status is JobStatus.succeeded, record.error
    assert record.worker == survivor.name and record.attempts == 2
    assert time.monotonic() - killed_at >= 9  # it waited for the visibility timeout, not less
    keys = [
        f"fleet/{record.job.output_prefix}/{record.job.batch_id}/{handle.job_id}/{i}.png" for i in range(2)
    ]
    assert stored_keys(fleet["s3"]) == keys
    assert [image.key for image in record.images] == [k.removeprefix("fleet/") for k in keys]
    # The survivor ran it exactly once: one "started" line for this job in its log.
    assert survivor.log.read_text().count(f"job {handle.job_id} started") == 1


def test_a_worker_killed_mid_batch_loses_none_of_the_jobs_it_took_along(fleet):
    client = fleet["client"]
    slow = {"model": TINY, "prompt": "a batch that survives", "steps": 40, "width": 160, "height": 160}
    handles = client.submit_many([slow | {"seed": s} for s in range(4)])  # all waiting when it starts
    ids = [h.job_id for h in handles]
    first = fleet["start_worker"]("batcher@recovery", LORAFLEET_WORKER_LOST_AFTER="8")
    wait_until(
        lambda: (
            sum(r.status is JobStatus.running and r.progress.step >= 2 for r in client.jobs.get_many(ids))
            == 4
        ),
        timeout=90,
        what="the four jobs sampling in one batch",
    )
    first.kill()  # three of the four messages were taken from the queue: only records hold them
    fleet["start_worker"]("second@recovery", LORAFLEET_WORKER_LOST_AFTER="8")
    records = client.wait(ids, timeout=300)
    assert [r.status for r in records] == [JobStatus.succeeded] * 4, [r.error for r in records]
    assert all(r.attempts == 2 and r.worker == "second@recovery" for r in records)
    assert stored_keys(fleet["s3"]) == sorted(
        f"fleet/{r.job.output_prefix}/{r.job.batch_id}/{r.job_id}/0.png" for r in records
    )


def test_uploads_ride_out_a_20_second_object_store_outage(fleet):
    client = fleet["client"]
    worker = fleet["start_worker"]("patient@recovery")
    fleet["proxy"].down()
    down_at = time.monotonic()
    handles = client.submit_many(
        [{"model": TINY, "prompt": f"outage {i}", "sampler": "lcm", "seed": i} for i in range(2)]
    )
    wait_until(lambda: "retrying in" in worker.log.read_text(), timeout=30, what="a failed upload")
    time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
    assert client.get(handles[0].job_id).status is JobStatus.running  # still trying, not failed
    fleet["proxy"].up()
    records = client.wait([h.job_id for h in handles], timeout=120)
    assert [r.status for r in records] == [JobStatus.succeeded] * 2, [r.error for r in records]
    assert len(stored_keys(fleet["s3"])) == 2
    assert all(r.attempts == 1 for r in records)


def test_an_object_store_that_stays_down_fails_the_job_after_job_attempts_runs(fleet):
    client = fleet["client"]
    worker = fleet["start_worker"](
        "hopeless@recovery", LORAFLEET_UPLOAD_ATTEMPTS="2", LORAFLEET_JOB_ATTEMPTS="2"
    )
    fleet["proxy"].down()
    handle = client.submit({"model": TINY, "prompt": "never stored", "sampler": "lcm", "seed": 1})
    record = handle.wait(timeout=120)
    assert record.status is JobStatus.failed and record.attempts == 2
    assert record.error.startswith("upload of images/") and "failed 2 times" in record.error
    assert record.error.endswith("(after 2 runs)")
    assert any("run 1 of at most 2 met a transient failure" in w for w in record.warnings)
    log = worker.log.read_text()
    assert log.count("retrying in 1.0 s") == 2  # one upload retry in each of the two runs
    assert log.count(f"job {handle.job_id} started") == 2


EXACT_ADDRESS_SPACE = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
"""glibc malloc settings under which a worker's address space (what ``limit_memory``'s
RLIMIT_AS counts) follows the memory it holds. By default glibc keeps what a job frees: its
mmap threshold rises to 32 MB after the first large free, so most tensors land in the heap and
arenas, which shrink only from the top, and the other threads' arenas (torch's, the store
stage's) grow by 64 MB reservations that stay. After a 512x512 job of 8 under the limit,
100 to 380 MB of address space stayed while the data alive grew by about 10 MB; which
allocation found room in what a job had left depended on thread timing: the first job's
4-image calls failed in some runs and not in others, and in CI the second job's, after the
first's had fit. With one arena, allocations over 128 KiB mapped on their own and the heap
top trimmed, what a job frees is given back: 15 MB stays after each job, and a call's peak is
the same every time, 344 MB over the warm worker at 4 images per call and 670 MB at 8 (as
much with 8 torch threads)."""


def test_a_batch_that_does_not_fit_is_halved_and_the_size_that_fit_is_kept(fleet):
    client = fleet["client"]
    worker = fleet["start_worker"]("halving@recovery", LORAFLEET_MAX_BATCH="8", **EXACT_ADDRESS_SPACE)
    warm = {"model": TINY, "prompt": "warm", "steps": 2}
    assert client.submit(warm).wait(timeout=60).status is JobStatus.succeeded
    # Room for four 512x512 images per call but not eight (344 and 670 MB, EXACT_ADDRESS_SPACE,
    # measured with 2 steps and CFG), about 160 MB from either: the allocations fail for real, as on a full GPU.
    worker.limit_memory(headroom_mb=512)
    # One step without CFG: a call's peak is its VAE decode, the same as with 2 steps and CFG,
    # and a job samples in a third of the time (with them, the failed call of 8 and the two
    # jobs took the test past pytest's 300 s on a loaded 2-core machine).
    big = {"model": TINY, "prompt": "eight at once", "width": 512, "height": 512, "num_images": 8}
    big |= {"steps": 1, "cfg_scale": 1.0}
    first = client.submit(big).wait(timeout=300)
    assert first.status is JobStatus.succeeded, first.error
    assert first.timings.batch_size == 4 and len(first.images) == 8
    log = worker.log.read_text()
    assert log.count("out of memory at 8 images per call") == 1 and log.count("out of memory at") == 1
    second = client.submit(big | {"seed": 99}).wait(timeout=300)
    assert second.status is JobStatus.succeeded and second.timings.batch_size == first.timings.batch_size
    assert worker.log.read_text().count("out of memory at") == log.count("out of memory at")  # kept


def test_a_job_that_runs_out_of_memory_fails_clearly_and_the_worker_keeps_serving(fleet):
    client = fleet["client"]
    worker = fleet["start_worker"]("small@recovery")
    before = client.submit(
        {
            "model": TINY,
            "prompt": "before",
            "sampler": "lcm",
            "seed": 8,
            "loras": [{"name": "watercolor", "weight": 0.8}],
        }
    ).wait(timeout=60)
    # Leave the worker little room: a small job fits, a 2048x2048 batch of 8 cannot, and its
    # allocations fail for real, as on a full GPU.
    worker.limit_memory(headroom_mb=96)
    huge = client.submit(
        {
            "model": TINY,
            "prompt": "too big",
            "width": 2048,
            "height": 2048,
            "num_images": 8,
            "loras": [{"name": "watercolor", "weight": 0.8}],
            "steps": 2,
        }
    )
    record = huge.wait(timeout=300)
    assert record.status is JobStatus.failed
    # the batch was halved down to one image per call before the job failed
    assert record.error.startswith("out of memory on cpu for one 2048x2048 image (batches were halved")
    assert "could not allocate" in record.error and "smaller images" in record.error
    after = client.submit(
        {
            "model": TINY,
            "prompt": "before",
            "sampler": "lcm",
            "seed": 8,
            "loras": [{"name": "watercolor", "weight": 0.8}],
        }
    ).wait(timeout=60)
    assert after.status is JobStatus.succeeded and worker.process.poll() is None
    assert after.images[0].sha256 == before.images[0].sha256  # pristine weights: identical pixels
