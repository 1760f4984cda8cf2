"""Images a job brings in (img2img's init image, an inpainting mask): stored once by sha256 in
the object store and named in jobs as ``sha256:<hex>``, so every job that names the same
bytes shares one object, and a PNG can name the exact input it was made from.

Semantics:
- ``put(data, field)`` checks the bytes (a PNG, JPEG (MPO too) or WebP that decodes whole, at most
  ``max_pixels`` pixels, refused before decoding when its header claims more: no
  decompression bomb is ever decoded) and stores them at ``inputs/<sha256>`` unless that
  object exists already. The same bytes give the same name; nothing is stored for a refusal.
- ``size(ref, field)`` is the (width, height) of a stored image as it is shown (its EXIF
  orientation applied, as the worker applies it), checked the same way (an
  object put there by other means is refused like an upload); ``get(ref)`` its bytes.
- Refusals are JobRejected naming ``field`` and what is allowed.
- With its ``retention`` (common/catalog/input_retention.py), an image is kept while a kept job
  record names it, and LORAFLEET_INPUT_IMAGE_GRACE after its upload while none does: ``put``
  keeps it the grace period, ``keep_for(jobs)`` (a submission, just before it writes its
  records) keeps it for the jobs, ``expire()`` (upkeep) deletes the objects of the images no
  kept job names any more. A job naming a deleted image is refused like one never uploaded:
  "upload it first".
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.common.catalog.input_retention import InputRetention
from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.errors import JobFailed, JobRejected, ObjectMissing, TransientError
from lorafleet.common.schema.inputs import IMAGE_REF, IMAGE_REF_ALLOWED
from lorafleet.common.schema.jobs import GenerationJob

logger = logging.getLogger(__name__)

INPUT_PREFIX = "inputs/"
"""Where input images live in the object store (beside the outputs' prefixes)."""
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
"""Image formats accepted, with the content type they are stored with (MPO: a JPEG with more
pictures after the first, as many phones write; the first is the image)."""
PUT_WAIT_SECONDS = 10.0
"""Longest an upload waits for upkeep to finish deleting the same image (then stores it again)."""
EXPIRE_BATCH = 100
"""Most images one upkeep pass looks at, and most it deletes."""
EXPIRE_BUDGET_SECONDS = 2.0
"""Time after which one upkeep pass deletes no more images (the rest wait for the next pass,
10 s later): a slow store never holds up a lost worker's hand-back for long."""


def image_ref(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def storage_key(ref: str) -> str:
    """Where image ``ref`` (``sha256:<hex>``, or the bare hex) is in the object store."""
    return INPUT_PREFIX + ref.removeprefix("sha256:")


def missing_image(ref: str, field: str) -> JobRejected:
    return JobRejected(
        f"no image {ref} in the store: upload it first (an input image is deleted once no kept job "
        "names it and LORAFLEET_INPUT_IMAGE_GRACE has passed since its upload)",
        field=field,
        allowed=IMAGE_REF_ALLOWED,
    )


@dataclass(frozen=True)
class CheckedImage:
    ref: str
    width: int
    height: int
    format: str


def upright(image):
    """The image as viewers show it: its EXIF orientation applied (A1111's and diffusers' way)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def check_image(data: bytes, field: str, max_pixels: int) -> CheckedImage:
    """The image in ``data``, decoded once to prove it whole; JobRejected names ``field``."""
    from PIL import Image, UnidentifiedImageError

    allowed = f"a PNG, JPEG (MPO too) or WebP image of at most {max_pixels:,} pixels"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height, kind = image.width, image.height, image.format
            if kind not in FORMATS:
                raise JobRejected(f"a {kind} image", field=field, allowed=allowed)
            if width * height > max_pixels:
                raise JobRejected(
                    f"{width}x{height} is {width * height:,} pixels, over the limit",
                    field=field,
                    allowed=allowed,
                )
            image.load()  # the whole image decodes (a truncated file does not)
            width, height = upright(image).size  # as shown: a phone's EXIF orientation applied
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise JobRejected(
                f"a decompression bomb, not decoded ({exc})", field=field, allowed=allowed
            ) from None
        except UnidentifiedImageError as exc:
            raise JobRejected(
                f"not an image lorafleet can read ({exc})", field=field, allowed=allowed
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise JobRejected(f"a damaged image ({exc})", field=field, allowed=allowed) from None
    return CheckedImage(image_ref(data), width, height, kind)


class InputImages:
    """Input images in the object store, by sha256."""

    def __init__(self, storage: Storage, max_pixels: int, retention: InputRetention | None = None) -> None:
        self.storage = storage
        self.max_pixels = max_pixels
        self.retention = retention
        """How long each image is kept; None: for good (a tool without a broker)."""

    def put(self, data: bytes, field: str = "image") -> CheckedImage:
        checked = check_image(data, field, self.max_pixels)
        key = storage_key(checked.ref)
        if self.retention is not None:
            self._keep_for_grace(checked.ref)  # first: upkeep leaves it alone from now on
        if not self.storage.exists(key):
            self.storage.put(key, data, FORMATS[checked.format])
        return checked

    def _keep_for_grace(self, ref: str) -> None:
        assert self.retention is not None
        deadline = time.monotonic() + PUT_WAIT_SECONDS
        while not self.retention.uploaded(ref.removeprefix("sha256:")):
            if time.monotonic() > deadline:
                raise TransientError(
                    f"input image {ref} is being deleted by upkeep (no kept job named it): upload it again in a minute"
                )
            time.sleep(0.1)

    def keep_for(self, jobs: Sequence[GenerationJob]) -> None:
        """Keep the images ``jobs`` name (the jobs of one submission, their ids set) as long as
        their records are kept; called just before the records are written. JobRejected names
        the first field naming an image deleted since it was checked."""
        if self.retention is None:
            return
        being_deleted, untracked = self.retention.named(jobs)
        missing = list(being_deleted.items()) + [
            (sha, field) for sha, field in untracked.items() if not self.storage.exists(storage_key(sha))
        ]
        if missing:
            sha, field = missing[0]
            raise missing_image(f"sha256:{sha}", field)

    def expire(self, limit: int = EXPIRE_BATCH, budget: float = EXPIRE_BUDGET_SECONDS) -> list[str]:
        """Delete the objects of the images whose time has passed and that no kept job record
        names (upkeep, under its lease), after finishing deletions cut short; at most ``limit``
        images, none more once ``budget`` seconds have passed. Returns the names deleted."""
        if self.retention is None:
            return []
        deadline = time.monotonic() + budget
        for sha in self.retention.cut_short(limit):
            self._delete(sha)
        gone = []
        for sha in self.retention.due(limit):
            if time.monotonic() > deadline:
                break
            if not self.retention.still_needed(sha) and self.retention.forget(sha) and self._delete(sha):
                gone.append(f"sha256:{sha}")
        return gone

    def _delete(self, sha: str) -> bool:
        assert self.retention is not None
        try:
            self.storage.delete(storage_key(sha))
        except (TransientError, JobFailed) as exc:  # still marked deleting: taken up again later
            logger.warning("input image sha256:%s not deleted yet: %s", sha, exc)
            return False
        self.retention.deleted(sha)
        logger.info("input image sha256:%s deleted: no kept job names it", sha)
        return True

    def get(self, ref: str) -> bytes:
        return self.storage.get(storage_key(ref))

    def size(self, ref: str, field: str) -> tuple[int, int]:
        if not IMAGE_REF.match(ref):
            raise JobRejected(f"{ref[:80]!r} names no stored image", field=field, allowed=IMAGE_REF_ALLOWED)
        try:
            data = self.get(ref)
        except ObjectMissing:
            raise missing_image(ref, field) from None
        checked = check_image(data, field, self.max_pixels)
        if checked.ref != ref:
            raise JobRejected(f"the stored object for {ref} holds other bytes", field=field)
        return checked.width, checked.height
