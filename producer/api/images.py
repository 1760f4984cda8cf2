"""Input images: POST /v1/images stores the request body (a PNG, JPEG or WebP) by its sha256
for jobs to name as ``init_image`` or ``mask_image``. The same bytes give the same name; a
refused body (not an image, too many pixels, a decompression bomb) stores nothing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from lorafleet.producer.api.state import State

router = APIRouter()


class StoredImage(BaseModel):
    image: str
    """The name jobs give it: ``sha256:<hex>``."""
    width: int
    height: int
    format: str


@router.post(
    "/v1/images",
    status_code=201,
    response_model=StoredImage,
    responses={422: {"description": "the body is not an image lorafleet takes; the problem says why"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                m: {"schema": {"type": "string", "format": "binary"}}
                for m in ("image/png", "image/jpeg", "image/webp")
            },
        }
    },
)
async def upload_image(request: Request, state: State):
    """Store an input image (the raw body) and return the name jobs give it."""
    data = await request.body()
    checked = await run_in_threadpool(state.client.input_images().put, data, "body")
    return StoredImage(image=checked.ref, width=checked.width, height=checked.height, format=checked.format)
