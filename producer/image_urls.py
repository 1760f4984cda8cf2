"""Input images named by an http(s) URL: fetched once at submit, checked and stored by sha256,
so the job (and its PNG) names the bytes it ran with, and a worker never reaches the URL.

The fetch follows the same address rules as LoRA downloads (common/infra/net.py): every hop's
host must resolve only to public addresses, unless it is listed in LORAFLEET_API_IMPORT_HOSTS,
and the connection goes to the address that was checked (no DNS rebinding). A refusal is a
JobRejected naming the job's field; an unreachable or failing server a TransientError.
"""

from __future__ import annotations

import time

from lorafleet.common.infra.net import checked_address, send_pinned
from lorafleet.common.schema.errors import JobRejected, TransientError

MAX_IMAGE_BYTES = 64 * 1024**2
"""Largest input image fetched by URL."""
MAX_REDIRECTS = 5
TIMEOUT_SECONDS = 30.0
DEADLINE_SECONDS = 60.0
"""Longest a whole fetch may take (a server dripping bytes would hold an API thread)."""


def fetch_image(url: str, field: str, allowed_hosts: set[str]) -> bytes:
    """The bytes at ``url`` (an image, checked by the caller), every hop's address checked."""
    import httpx

    allowed = "a public http(s) URL, or a host listed in LORAFLEET_API_IMPORT_HOSTS"
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        with httpx.Client(follow_redirects=False, timeout=TIMEOUT_SECONDS) as http:
            for _ in range(MAX_REDIRECTS + 1):
                host = httpx.URL(url).host
                address = (
                    None
                    if host in allowed_hosts
                    else checked_address(url, error=JobRejected, field=field, allowed=allowed)
                )
                response = send_pinned(http, "GET", url, address, stream=True)
                try:
                    if not response.is_redirect:
                        return _body(response, url, field, deadline)
                    url = str(httpx.URL(url).join(response.headers.get("location", "")))
                finally:
                    response.close()
    except httpx.HTTPError as exc:
        raise TransientError(f"{field}: fetching {url} failed: {exc}") from None
    raise JobRejected(f"{url}: more than {MAX_REDIRECTS} redirects", field=field)


def _body(response, url: str, field: str, deadline: float) -> bytes:
    if response.status_code >= 500 or response.status_code == 429:
        raise TransientError(f"{field}: {url} answered HTTP {response.status_code}; try again later")
    if response.status_code >= 400:
        raise JobRejected(f"{url} answered HTTP {response.status_code} {response.reason_phrase}", field=field)
    data = bytearray()
    for chunk in response.iter_bytes(1024 * 1024):
        data += chunk
        if time.monotonic() > deadline:
            raise JobRejected(f"{url} took more than {DEADLINE_SECONDS:g} s to send", field=field)
        if len(data) > MAX_IMAGE_BYTES:
            raise JobRejected(f"{url} sent more than {MAX_IMAGE_BYTES // 1024**2} MiB", field=field)
    return bytes(data)
