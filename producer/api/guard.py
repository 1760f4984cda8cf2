"""What every request must pass before any route reads it: size, content type, Host, Origin.

- A body over ``api_max_body_mb`` (the login form: 4 KiB) is refused with 413 before it is
  read; a body without a Content-Length (chunked) with 411, so no size goes unchecked.
- A call that changes state (POST, PUT, PATCH, DELETE under ``/v1/``) must say
  ``Content-Type: application/json`` (415; ``POST /v1/images`` an image type): a browser
  cannot send those cross-site without asking first, so another site's page cannot submit or
  cancel through a visitor's browser.
- Without tokens (``serve`` then listens on loopback only), the Host header must name this
  machine (``localhost``, ``127.0.0.1``, ``::1``, or a name in ``api_allowed_hosts``) and
  an Origin header, when sent, the same: a page whose name was re-pointed at 127.0.0.1 (DNS
  rebinding) is refused with 403.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOGIN_MAX_BODY = 4096
"""Largest login form body, in bytes (a token and a path)."""
IMAGE_UPLOADS = "/v1/images"
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp"}
"""What POST /v1/images takes instead of JSON: the image itself (a browser must ask first to
send these cross-site, as for JSON)."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(value: str) -> str:
    """``example.com:8750`` -> ``example.com``; ``[::1]:8750`` -> ``::1``."""
    return (urlsplit(f"//{value}").hostname or "").lower()


class RequestGuard:
    """ASGI middleware applying the rules above; ``allowed_hosts`` None: tokens guard access."""

    def __init__(self, app: ASGIApp, *, max_body: int, allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, detail = refusal
            await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return (
                    403,
                    f"Host {host or '(none)'!r} is not served here (allowed: {', '.join(sorted(self.allowed_hosts))})",
                )
            origin = headers.get("origin")
            if (
                origin
                and origin != "null"
                and (urlsplit(origin).hostname or "").lower() not in self.allowed_hosts
            ):
                return 403, f"requests from {origin} are refused: the API serves its own pages only"
        if "transfer-encoding" in headers:
            return 411, "send the body with a Content-Length"
        limit = LOGIN_MAX_BODY if path == "/login" else self.max_body
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "Content-Length is not a number"
            if int(length) > limit:
                return 413, (
                    f"the body is {int(length)} bytes; at most {limit} are accepted here"
                    + (" (LORAFLEET_API_MAX_BODY_MB)" if path != "/login" else "")
                )
        if method in STATE_CHANGING and path.startswith("/v1/"):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if path == IMAGE_UPLOADS and kind in IMAGE_TYPES:  # not CORS-safelisted either
                return None
            if kind != "application/json":
                return 415, "calls that change state need 'Content-Type: application/json'"
        return None
