"""Two worker hosts for real: each in its own network namespace (ip netns, veth pairs), with
Redis and the S3 server on a third address. Models are registered by name in Redis; each
host serves one; jobs for both land on the host that serves their model and all complete.

Inside a namespace 127.0.0.1 is that namespace's own loopback, so a worker that reached for
anything but the shared addresses (an embedded Redis, a local folder store) would fail.
"""

from __future__ import annotations

import subprocess
import uuid

import boto3
import pytest

from lorafleet.common.schema.jobs import JobStatus
from lorafleet.common.schema.settings import Settings
from lorafleet.producer import Client
from tests.conftest import TINY, TINY_XL
from tests.helpers import (
    BIN,
    RedisProcess,
    WorkerProcess,
    free_port,
    lorafleet_env,
    run_cli,
    s3_env,
    wait_until,
)

pytestmark = pytest.mark.slow

SERVICES = "10.77.3.1"
HOSTS = {"a": ("10.77.1.1", "10.77.1.2"), "b": ("10.77.2.1", "10.77.2.2")}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def network():
    """Namespaces lf-<tag>-a and lf-<tag>-b, each reaching SERVICES (an address on this
    machine's loopback) through its own veth pair."""
    tag = uuid.uuid4().hex[:6]
    made_ns, made_links, services_added = [], [], False
    try:
        ip("addr", "add", f"{SERVICES}/32", "dev", "lo")  # the third address, for Redis and S3
        services_added = True
        namespaces = {}
        for host, (outside, inside) in HOSTS.items():
            ns, veth, peer = f"lf-{tag}-{host}", f"lf{tag}{host}0", f"lf{tag}{host}1"
            ip("netns", "add", ns)
            made_ns.append(ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            made_links.append(veth)
            ip("link", "set", peer, "netns", ns)
            ip("addr", "add", f"{outside}/30", "dev", veth)
            ip("link", "set", veth, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{inside}/30", "dev", peer)
            ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            ip("netns", "exec", ns, "ip", "route", "add", "default", "via", outside)
            namespaces[host] = ns
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"this test needs root and `ip netns` (CAP_SYS_ADMIN, CAP_NET_ADMIN): {exc.stderr}")
    yield namespaces
    for ns in made_ns:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    for link in made_links:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    if services_added:
        subprocess.run(["ip", "addr", "del", f"{SERVICES}/32", "dev", "lo"], capture_output=True)


def test_two_hosts_in_their_own_namespaces_each_run_the_jobs_of_their_model(network, template_home, tmp_path):
    redis = RedisProcess(
        tmp_path / "redis", extra=["--bind", "127.0.0.1", SERVICES, "--protected-mode", "no"]
    ).start()
    moto_port = free_port()
    moto = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", SERVICES, "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://{SERVICES}:{moto_port}"
    broker = f"redis://{SERVICES}:{redis.port}/0"
    workers = []
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        wait_until(lambda: _up(s3), timeout=30, what="moto on the services address")
        s3.create_bucket(Bucket="fleet")
        producer_home = tmp_path / "producer"
        producer_home.mkdir()
        env = lorafleet_env(producer_home, broker, "s3://fleet/out", **s3_env(endpoint))
        for name, folder in (("fleet-sd15", TINY), ("fleet-sdxl", TINY_XL)):
            added = run_cli(["models", "add", name, str(template_home / "models" / folder)], env)
            assert added.returncode == 0, added.stderr
        for host, model in (("a", "fleet-sd15"), ("b", "fleet-sdxl")):
            home = tmp_path / f"host-{host}"
            home.mkdir()
            host_env = lorafleet_env(home, broker, "s3://fleet/out", **s3_env(endpoint))
            workers.append(
                WorkerProcess(
                    host_env,
                    model,
                    tmp_path / f"{host}.log",
                    name=f"{model}@host-{host}",
                    prefix=["ip", "netns", "exec", network[host]],
                ).start()
            )
        settings = Settings(
            home=producer_home, broker_url=broker, storage_url="s3://fleet/out", s3_endpoint_url=endpoint
        )
        with Client(settings) as client:
            handles = client.submit_many(
                [
                    {"model": model, "prompt": f"{model} {i}", "sampler": "lcm", "seed": i}
                    for i in range(3)
                    for model in ("fleet-sd15", "fleet-sdxl")
                ]
            )
            assert all(h.warnings == [] for h in handles)  # both models have a live worker
            records = client.wait([h.job_id for h in handles], timeout=240)
        assert [r.status for r in records] == [JobStatus.succeeded] * 6, [r.error for r in records]
        for record in records:
            host = "a" if record.job.model == "fleet-sd15" else "b"
            assert record.worker == f"{record.job.model}@host-{host}"
            assert s3.head_object(Bucket="fleet", Key=f"out/{record.images[0].key}")["ContentLength"] > 0
        peers = {c["addr"].rsplit(":", 1)[0] for c in redis.client().client_list()}
        assert {HOSTS["a"][1], HOSTS["b"][1]} <= peers  # the workers really came from their namespaces
    finally:
        for worker in workers:
            worker.stop()
        moto.terminate()
        moto.wait(10)
        redis.stop()


def _up(s3) -> bool:
    try:
        s3.list_buckets()
        return True
    except Exception:
        return False
