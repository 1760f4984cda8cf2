"""Access to the API and the dashboard: bearer tokens, or a session the login form opens.

With LORAFLEET_API_TOKENS set (comma-separated), every request but the login page, the
stylesheet and the health check must carry one of the tokens as ``Authorization: Bearer
<token>``, or the ``lorafleet_session`` cookie that the login form sets (HttpOnly,
SameSite=Strict, Secure over https, including behind a proxy whose forwarded headers
uvicorn trusts). The cookie holds a random session id, never the token: the session lives
in Redis (``keys.session``) for COOKIE_SECONDS, remembers which token opened it (its
sha256), and ends at log out, or when that token is no longer configured. Without tokens,
``serve`` listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from lorafleet.common import keys

COOKIE = "lorafleet_session"
COOKIE_SECONDS = 30 * 24 * 3600
"""How long a dashboard session lasts."""
OPEN_PATHS = ("/login", "/healthz", "/static/style.css")
"""Paths served without a token."""
PAGE_PREFIXES = ("/", "/jobs/", "/batches/")
"""Dashboard pages: a browser without a token is sent to the login form."""


def parse_tokens(raw: str | None) -> list[str]:
    return [t.strip() for t in (raw or "").split(",") if t.strip()]


def token_ok(token: str | None, tokens: list[str]) -> bool:
    if not token:
        return False
    return any(hmac.compare_digest(token.encode(), known.encode()) for known in tokens)


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _session_key(session_id: str) -> str:
    return keys.session(hashlib.sha256(session_id.encode()).hexdigest())


def open_session(client, token: str) -> str:
    """A new session for ``token`` (already checked); returns the id the cookie carries."""
    session_id = secrets.token_urlsafe(32)
    client.set(_session_key(session_id), _fingerprint(token), ex=COOKIE_SECONDS)
    return session_id


def close_session(client, session_id: str | None) -> None:
    if session_id:
        client.delete(_session_key(session_id))


def session_ok(client, session_id: str | None, tokens: list[str]) -> bool:
    """Whether the cookie's session is open and the token that opened it still configured."""
    if not session_id:
        return False
    stored = client.get(_session_key(session_id))
    if stored is None:
        return False
    stored = stored.decode() if isinstance(stored, bytes) else stored
    return any(hmac.compare_digest(stored, _fingerprint(known)) for known in tokens)


def authorized(request: Request, tokens: list[str], client) -> bool:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return token_ok(header[7:].strip(), tokens)
    return session_ok(client, request.cookies.get(COOKIE), tokens)


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PREFIXES[1:])


class TokenMiddleware(BaseHTTPMiddleware):
    """Refuses requests without a valid token when tokens are configured."""

    def __init__(self, app, tokens: list[str], client) -> None:
        super().__init__(app)
        self.tokens = tokens
        self.client = client

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        if not self.tokens or path in OPEN_PATHS or authorized(request, self.tokens, self.client):
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
