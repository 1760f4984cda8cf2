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
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from lorafleet.common.infra.storage import Storage
from lorafleet.common.schema.errors import JobRejected, ObjectMissing
from lorafleet.common.schema.inputs import IMAGE_REF, IMAGE_REF_ALLOWED

INPUT_PREFIX = "inputs/"
"""Where input images live in the object store (beside the outputs' prefixes)."""
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
"""Image formats accepted, with the content type they are stored with (MPO: a JPEG with more
pictures after the first, as many phones write; the first is the image)."""


def image_ref(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def storage_key(ref: str) -> str:
    return INPUT_PREFIX + ref.removeprefix("sha256:")


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

    def __init__(self, storage: Storage, max_pixels: int) -> None:
        self.storage = storage
        self.max_pixels = max_pixels

    def put(self, data: bytes, field: str = "image") -> CheckedImage:
        checked = check_image(data, field, self.max_pixels)
        key = storage_key(checked.ref)
        if not self.storage.exists(key):
            self.storage.put(key, data, FORMATS[checked.format])
        return checked

    def get(self, ref: str) -> bytes:
        return self.storage.get(storage_key(ref))

    def size(self, ref: str, field: str) -> tuple[int, int]:
        if not IMAGE_REF.match(ref):
            raise JobRejected(f"{ref[:80]!r} names no stored image", field=field, allowed=IMAGE_REF_ALLOWED)
        try:
            data = self.get(ref)
        except ObjectMissing:
            raise JobRejected(
                f"no image {ref} in the store: upload it first", field=field, allowed=IMAGE_REF_ALLOWED
            ) from None
        checked = check_image(data, field, self.max_pixels)
        if checked.ref != ref:
            raise JobRejected(f"the stored object for {ref} holds other bytes", field=field)
        return checked.width, checked.height
