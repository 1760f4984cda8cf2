"""Access to the API and the dashboard: bearer tokens, or a cookie set by the login form.

With LORAFLEET_API_TOKENS set (comma-separated), every request but the login page, the
stylesheet and the health check must carry one of the tokens, as ``Authorization: Bearer
<token>`` or in the ``lorafleet_token`` cookie that the login form sets (HttpOnly,
SameSite=Strict, so another site cannot use it). Without tokens, ``serve`` listens on
127.0.0.1 only.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

COOKIE = "lorafleet_token"
OPEN_PATHS = ("/login", "/healthz", "/static/style.css")
"""Paths served without a token."""
PAGE_PREFIXES = ("/", "/jobs/", "/batches/")
"""Dashboard pages: a browser without a token is sent to the login form."""


def parse_tokens(raw: str | None) -> list[str]:
    return [t.strip() for t in (raw or "").split(",") if t.strip()]


def presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


def token_ok(token: str | None, tokens: list[str]) -> bool:
    if not token:
        return False
    return any(hmac.compare_digest(token.encode(), known.encode()) for known in tokens)


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PREFIXES[1:])


class TokenMiddleware(BaseHTTPMiddleware):
    """Refuses requests without a valid token when tokens are configured."""

    def __init__(self, app, tokens: list[str]) -> None:
        super().__init__(app)
        self.tokens = tokens

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if not self.tokens or path in OPEN_PATHS or token_ok(presented_token(request), self.tokens):
            return await call_next(request)
        if request.method == "GET" and _is_page(path):
            return RedirectResponse(f"/login?next={path}", status_code=303)
        return JSONResponse(
            {
                "detail": "a valid token is required: send 'Authorization: Bearer <token>' "
                "(one of LORAFLEET_API_TOKENS) or log in at /login"
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
