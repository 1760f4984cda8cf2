"""Object storage: a local folder or an S3-compatible bucket, behind one small interface.

Keys are deterministic (``<prefix>/<batch_id>/<job_id>/<index>.png``), so a job that is
delivered twice overwrites its images instead of duplicating them, and no key ever leaves
the store's root: every key is checked segment by segment before it is used.

S3 goes through boto3 with credentials from the standard AWS sources only (environment,
shared files, instance or pod roles); the endpoint URL makes MinIO, R2 or any
S3-compatible store work. Failures that may pass (connection refused, 5xx, throttling)
raise TransientError; an object that is not there raises ObjectMissing; a refusal (403)
says access is denied; the rest raise JobFailed with what to fix.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

from lorafleet.common.schema.errors import ConfigError, JobFailed, ObjectMissing, TransientError
from lorafleet.common.schema.jobs import ID_PATTERN, PREFIX_PATTERN
from lorafleet.common.schema.settings import Settings

logger = logging.getLogger(__name__)

_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PRESIGN_SECONDS = 3600
"""Lifetime of a presigned S3 URL handed to the dashboard."""
CHUNK_BYTES = 1024 * 1024
"""What a download holds in memory at once."""


def check_key(key: str) -> str:
    """Refuse a key that could escape the store's root (absolute, ``..``, odd characters)."""
    segments = key.split("/")
    if not key or any(not _KEY_SEGMENT.match(s) for s in segments):
        raise JobFailed(
            f"storage key {key!r} refused: keys are '/'-separated segments of letters, "
            "digits, '.', '_' and '-', each starting with a letter or digit"
        )
    return key


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(source: Path, destination: Path) -> None:
    """Copy a file so that readers of ``destination`` never see a part of it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=".part-")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pump(read, out: BinaryIO) -> int:
    """Copy ``read``'s chunks into ``out`` until it is empty; the bytes copied."""
    total = 0
    while chunk := read(CHUNK_BYTES):
        out.write(chunk)
        total += len(chunk)
    return total


def image_key(prefix: str, batch_id: str, job_id: str, index: int) -> str:
    """Where image ``index`` of a job goes; the same job always gets the same keys."""
    if not PREFIX_PATTERN.match(prefix) or not ID_PATTERN.match(batch_id) or not ID_PATTERN.match(job_id):
        raise JobFailed(f"refusing to build a storage key from {prefix!r}, {batch_id!r}, {job_id!r}")
    return check_key(f"{prefix}/{batch_id}/{job_id}/{index}.png")


class Storage(Protocol):
    """Where images (and, across machines, LoRA files) are kept."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` under ``key`` (replacing any object there); return its URI."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectMissing if it does not exist."""

    def download(self, key: str, out: BinaryIO) -> int:
        """Stream the object into ``out`` a chunk at a time (never whole in memory); the
        number of bytes written. ObjectMissing if it does not exist."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; nothing happens if there is none."""

    def uri(self, key: str) -> str: ...

    def describe(self) -> str: ...


class LocalStorage:
    """A folder on this machine (or a shared mount); writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(key)
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise TransientError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return path.as_uri()

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r} in {self.root}") from None
        except OSError as exc:
            raise TransientError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def download(self, key: str, out: BinaryIO) -> int:
        path = self._path(key)
        try:
            with path.open("rb") as source:
                return _pump(source.read, out)
        except FileNotFoundError:
            raise ObjectMissing(f"no object {key!r} in {self.root}") from None
        except OSError as exc:
            raise TransientError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise TransientError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def describe(self) -> str:
        return str(self.root)


class S3Storage:
    """An S3-compatible bucket, under an optional key prefix."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.endpoint_url = endpoint_url
        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            return fn(Bucket=self.bucket, Key=self._full(key), **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            where = f"s3://{self.bucket}/{self._full(key)}"
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise TransientError(f"{what} {where}: {code} {error.get('Message', '')}".strip()) from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectMissing(f"{what} {where}: no such object") from exc
            if status == 403 or code in ("AccessDenied", "403", "Forbidden"):
                raise JobFailed(
                    f"{what} {where}: access denied — the AWS credentials may not read or write this bucket"
                ) from exc
            raise JobFailed(
                f"{what} {where}: {code} {error.get('Message', '')} — check the bucket name, "
                "LORAFLEET_S3_ENDPOINT_URL and the AWS credentials' permissions"
            ) from exc
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise TransientError(f"{what} s3://{self.bucket}: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self._call("upload to", key, self.client.put_object, Body=data, ContentType=content_type)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        response = self._call("download of", key, self.client.get_object)
        return response["Body"].read()

    def download(self, key: str, out: BinaryIO) -> int:
        from botocore.exceptions import BotoCoreError

        body = self._call("download of", key, self.client.get_object)["Body"]
        try:
            return _pump(body.read, out)
        except (BotoCoreError, OSError) as exc:  # the connection broke mid-object
            raise TransientError(f"download of s3://{self.bucket}/{self._full(key)}: {exc}") from exc
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self._call("lookup of", key, self.client.head_object)
        except ObjectMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("deletion of", key, self.client.delete_object)  # S3 answers 204 for a missing key too

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def presigned_url(self, key: str, seconds: int = PRESIGN_SECONDS) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=seconds
        )

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} via {self.endpoint_url}" if self.endpoint_url else where


def open_storage(settings: Settings) -> LocalStorage | S3Storage:
    """The store named by LORAFLEET_STORAGE_URL (a folder, file://, or s3://bucket/prefix)."""
    url = settings.outputs_url
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"LORAFLEET_STORAGE_URL {url!r} names no bucket: use s3://bucket/prefix")
        return S3Storage(
            parts.netloc, parts.path, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
    if parts.scheme == "file":
        return LocalStorage(Path(parts.path))
    if parts.scheme == "" or len(parts.scheme) == 1:  # a path (a Windows drive letter too)
        return LocalStorage(Path(url))
    raise ConfigError(
        f"LORAFLEET_STORAGE_URL scheme {parts.scheme!r} is not supported; allowed: a folder path, "
        "file:///folder or s3://bucket/prefix"
    )
