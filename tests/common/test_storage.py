"""Storage: a local folder and a real S3-compatible HTTP server (moto's server mode)."""

from __future__ import annotations

import io
import urllib.request

import boto3
import pytest

from lorafleet.common.infra.storage import LocalStorage, S3Storage, check_key, image_key, open_storage
from lorafleet.common.schema.errors import ConfigError, JobFailed, ObjectMissing, TransientError
from lorafleet.common.schema.settings import Settings
from tests.helpers import free_port


@pytest.mark.parametrize(
    "key", ["../escape.png", "/abs/key.png", "a/../../b", "a//b", "a/./b", "", "a/b\x00"]
)
def test_keys_never_escape_the_store(key, tmp_path):
    with pytest.raises(JobFailed, match="refused"):
        check_key(key)
    with pytest.raises(JobFailed):
        LocalStorage(tmp_path).put(key, b"x")


def test_image_keys_are_deterministic():
    assert image_key("images", "b1", "j1", 0) == "images/b1/j1/0.png"
    assert image_key("images", "b1", "j1", 0) == image_key("images", "b1", "j1", 0)
    with pytest.raises(JobFailed):
        image_key("images", "..", "j1", 0)


def test_local_put_overwrites_atomically(tmp_path):
    store = LocalStorage(tmp_path / "out")
    uri = store.put("images/b/j/0.png", b"first")
    store.put("images/b/j/0.png", b"second")
    assert uri.startswith("file://")
    assert store.get("images/b/j/0.png") == b"second"
    assert [p.name for p in (tmp_path / "out/images/b/j").iterdir()] == ["0.png"]
    with pytest.raises(JobFailed, match="no object"):
        store.get("images/b/j/1.png")


def test_local_delete_removes_the_object_once(tmp_path):
    store = LocalStorage(tmp_path / "out")
    store.put("inputs/abc", b"bytes")
    store.delete("inputs/abc")
    store.delete("inputs/abc")  # a missing object: nothing to do
    assert not store.exists("inputs/abc")
    with pytest.raises(JobFailed, match="refused"):
        store.delete("../escape")


def test_storage_url_picks_the_backend(tmp_path):
    assert isinstance(open_storage(Settings(home=tmp_path)), LocalStorage)
    assert open_storage(Settings(home=tmp_path)).root == tmp_path / "outputs"
    assert isinstance(open_storage(Settings(home=tmp_path, storage_url=f"file://{tmp_path}/x")), LocalStorage)
    with pytest.raises(ConfigError, match="allowed: a folder path"):
        open_storage(Settings(home=tmp_path, storage_url="ftp://host/x"))
    with pytest.raises(ConfigError, match="names no bucket"):
        open_storage(Settings(home=tmp_path, storage_url="s3://"))


def test_s3_round_trip_through_a_real_server(s3_credentials):
    endpoint = s3_credentials.endpoint
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="round-trip")
    settings = Settings(storage_url="s3://round-trip/run-1", s3_endpoint_url=endpoint)
    store = open_storage(settings)
    assert isinstance(store, S3Storage)
    uri = store.put("images/b/j/0.png", b"png bytes", "image/png")
    assert uri == "s3://round-trip/run-1/images/b/j/0.png"
    assert store.get("images/b/j/0.png") == b"png bytes"
    streamed = io.BytesIO()
    assert store.download("images/b/j/0.png", streamed) == 9 and streamed.getvalue() == b"png bytes"
    with pytest.raises(ObjectMissing):
        store.download("images/b/j/9.png", io.BytesIO())
    assert store.exists("images/b/j/0.png") and not store.exists("images/b/j/1.png")
    with urllib.request.urlopen(store.presigned_url("images/b/j/0.png")) as response:
        assert response.read() == b"png bytes"
    head = boto3.client("s3", endpoint_url=endpoint).head_object(
        Bucket="round-trip", Key="run-1/images/b/j/0.png"
    )
    assert head["ContentType"] == "image/png"
    store.delete("images/b/j/0.png")
    store.delete("images/b/j/0.png")  # a missing object: nothing to do
    assert not store.exists("images/b/j/0.png")


def test_s3_missing_bucket_is_a_failure_that_says_what_to_check(s3_credentials):
    store = S3Storage("no-such-bucket", endpoint_url=s3_credentials.endpoint)
    with pytest.raises(JobFailed, match="check the bucket name"):
        store.put("images/a.png", b"x")


def test_s3_unreachable_is_transient(s3_credentials):
    store = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError):
        store.put("images/a.png", b"x")
