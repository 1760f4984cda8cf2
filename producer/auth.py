"""Access to the API and the dashboard: bearer tokens, or a session the login form opens.

With LORAFLEET_API_TOKENS set (comma-separated), every request but the login page, the
stylesheet and the health check must carry one of the tokens as ``Authorization: Bearer
<token>``, or the ``lorafleet_session`` cookie that the login form sets (HttpOnly,
SameSite=Strict, Secure over https, including behind a proxy whose forwarded headers
uvicorn trusts). The cookie holds a random session id, never the token: the session lives
in Redis (``keys.session``) for COOKIE_SECONDS, remembers which token opened it (its
sha256), and ends at log out, or when that token is no longer configured. Without tokens,
``serve`` listens on 127.0.0.1 only.

Tokens belong to tenants: ``tenant:token`` makes a tenant's token, whose caller sees and acts
on that tenant's jobs and batches only (``request.state.tenant``); a bare token, or one of
tenant ``admin``, is an operator's and sees every job.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import ConfigError
from lorafleet.common.schema.jobs import ADMIN_TENANT, TENANT_PATTERN

COOKIE = "lorafleet_session"
COOKIE_SECONDS = 30 * 24 * 3600
"""How long a dashboard session lasts."""
OPEN_PATHS = ("/login", "/healthz", "/static/style.css")
"""Paths served without a token."""
PAGE_PREFIXES = ("/", "/jobs/", "/batches/")
"""Dashboard pages: a browser without a token is sent to the login form."""


@dataclass(frozen=True)
class ApiToken:
    """One of LORAFLEET_API_TOKENS and whose it is."""

    token: str
    tenant: str | None
    """The tenant whose jobs it sees; None: an operator's token, which sees every job."""


def parse_tokens(raw: str | None) -> list[ApiToken]:
    """LORAFLEET_API_TOKENS: comma-separated ``tenant:token`` pairs or bare (operator) tokens."""
    tokens = []
    for entry in (t.strip() for t in (raw or "").split(",")):
        if not entry:
            continue
        tenant, sep, token = entry.partition(":")
        if not sep:
            tokens.append(ApiToken(entry, None))
            continue
        if not TENANT_PATTERN.match(tenant) or not token.strip():
            raise ConfigError(
                f"LORAFLEET_API_TOKENS entry {tenant!r}:... is refused: a tenant is 1-32 of a-z, 0-9, "
                "'_' and '-' (starting with a letter or digit), followed by ':' and its token"
            )
        tokens.append(ApiToken(token.strip(), None if tenant == ADMIN_TENANT else tenant))
    if len({t.token for t in tokens}) != len(tokens):
        raise ConfigError("LORAFLEET_API_TOKENS holds the same token twice: each token names one tenant")
    return tokens


def find_token(token: str | None, tokens: list[ApiToken]) -> ApiToken | None:
    """The configured token equal to ``token`` (compared in constant time), or None."""
    found = None
    for known in tokens:
        if token and hmac.compare_digest(token.encode(), known.token.encode()):
            found = known
    return found


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


def session_token(client, session_id: str | None, tokens: list[ApiToken]) -> ApiToken | None:
    """The token that opened the cookie's session, if the session is open and that token
    still configured; else None."""
    if not session_id:
        return None
    stored = client.get(_session_key(session_id))
    if stored is None:
        return None
    stored = stored.decode() if isinstance(stored, bytes) else stored
    found = None
    for known in tokens:
        if hmac.compare_digest(stored, _fingerprint(known.token)):
            found = known
    return found


async def caller(request: Request, tokens: list[ApiToken], client) -> ApiToken | None:
    """The token a request carries (bearer header, else the session cookie), or None. The
    session is read from Redis in the threadpool: a slow Redis holds up this request only,
    never the event loop that serves every other."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return find_token(header[7:].strip(), tokens)
    return await run_in_threadpool(session_token, client, request.cookies.get(COOKIE), tokens)


def _is_page(path: str) -> bool:
    return path == "/" or path.startswith(PAGE_PREFIXES[1:])


class TokenMiddleware(BaseHTTPMiddleware):
    """Refuses requests without a valid token when tokens are configured."""

    def __init__(self, app, tokens: list[ApiToken], client) -> None:
        super().__init__(app)
        self.tokens = tokens
        self.client = client

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path = request.url.path
        request.state.tenant = None
        if not self.tokens or path in OPEN_PATHS:
            return await call_next(request)
        found = await caller(request, self.tokens, self.client)
        if found is not None:
            request.state.tenant = found.tenant
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
