"""LoRAs: POST /v1/loras imports one from a download link or a hub repo for the whole fleet.

The server downloads on the client's behalf, so the source is restricted: an http(s) URL
whose every hop resolves to public addresses (or to a host in LORAFLEET_API_IMPORT_HOSTS),
or a hub repo (reached through the server's own HF_ENDPOINT). The server's files and
folders are never offered, and a refused source leaves nothing behind.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.producer.api.state import State
from lorafleet.producer.lora_imports import import_lora
from lorafleet.producer.lora_sources import public_hosts_only

router = APIRouter()


class LoraImport(BaseModel):
    """What to import: a source, and optionally its name, its expected sha256, --force."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1, max_length=2000, description="an http(s) URL or owner/repo[/file.safetensors]"
    )
    name: str | None = Field(default=None, max_length=200)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    force: bool = False


class ImportedView(BaseModel):
    name: str
    sha256: str
    size: int
    format: str
    family: str | None
    rank: int | None
    trigger_words: list[str]
    already_imported: bool
    stored_as: str | None


@router.post(
    "/v1/loras",
    status_code=201,
    response_model=ImportedView,
    responses={422: {"description": "the source or a field was refused; the problem names it"}},
)
async def import_from_source(body: LoraImport, state: State):
    """Import a LoRA from a download link or a hub repo: checked, stored by hash, registered."""
    settings = state.settings
    allowed = {h.strip() for h in (settings.api_import_hosts or "").split(",") if h.strip()}
    result = await run_in_threadpool(
        import_lora,
        settings,
        body.source,
        state.client.redis,
        name=body.name,
        sha256=body.sha256,
        force=body.force,
        remote=public_hosts_only(allowed),
    )
    info = result.info
    return ImportedView(
        name=info.name,
        sha256=info.sha256,
        size=info.size,
        format=info.format,
        family=info.family.value if info.family else None,
        rank=info.rank,
        trigger_words=info.trigger_words,
        already_imported=result.already_imported,
        stored_as=result.stored_as,
    )
