"""Idempotent submits: a retried request gets the jobs its first try created, never a second batch.

A submit or sweep may carry an idempotency key (HTTP ``Idempotency-Key``; ``idempotency_key=``
in the SDK). Before it queues anything, the submit claims the key in Redis (SET NX on
``keys.idempotency``, per tenant) with the request's fingerprint: the sha256 of its canonical
JSON (the jobs or sweep as given, ``batch_id``, ``require_worker``, ``batch_webhook_url``), taken
as the client sent it, before a batch id is made up for it, so a retry without a ``batch_id`` is
the same request. Then:

- the first request queues its jobs and stores their ids under the key, kept
  LORAFLEET_IDEMPOTENCY_SECONDS; a refused one releases the key (nothing was created);
- the same key with the same request gets the stored ids (the API answers 200, not 201);
- the same key with another request, or while the first is still being handled, is a
  DuplicateRequest (HTTP 409) that says which.

So a client that retries after a timeout, not knowing whether its first try arrived, never
creates duplicates.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import redis

from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import BadArgument, DuplicateRequest

KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
"""An idempotency key: 1-255 printable ASCII characters, no spaces."""
PENDING_SECONDS = 300
"""How long a claim lasts while its request is being handled (a producer that dies lets go)."""
OPERATORS = "-"
"""The scope of keys used without a tenant."""


def fingerprint(request: Any) -> str:
    """The sha256 of a request's canonical JSON (keys sorted, no spaces)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class IdempotencyKeys:
    """Claims, answers and releases idempotency keys in Redis."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    def _name(self, key: str, tenant: str | None) -> str:
        if not KEY_PATTERN.match(key):
            raise BadArgument(
                f"{key[:40]!r} is not an idempotency key",
                field="Idempotency-Key",
                allowed="1-255 printable ASCII characters without spaces (a UUID, say)",
            )
        return keys.idempotency(tenant or OPERATORS, hashlib.sha256(key.encode()).hexdigest())

    def claim(self, key: str, tenant: str | None, request_fingerprint: str) -> list[str] | None:
        """None: this request is the key's first; queue it, then ``done`` or ``release``. Else
        the job ids the first request created."""
        name = self._name(key, tenant)
        pending = json.dumps({"fingerprint": request_fingerprint, "state": "pending"})
        for _ in range(3):  # a stored answer may expire between SET NX and GET
            if self.redis.set(name, pending, nx=True, ex=PENDING_SECONDS):
                return None
            raw = self.redis.get(name)
            if raw is None:
                continue
            stored = json.loads(raw)
            if stored["fingerprint"] != request_fingerprint:
                raise DuplicateRequest(
                    "this Idempotency-Key was used with another request (other jobs or sweep, batch_id or "
                    "require_worker): use a new key for a new request"
                )
            if stored["state"] != "done":
                raise DuplicateRequest(
                    "a request with this Idempotency-Key is still being handled: retry in a moment"
                )
            return list(stored["job_ids"])
        raise DuplicateRequest("this Idempotency-Key keeps changing hands: retry in a moment")

    def done(self, key: str, tenant: str | None, request_fingerprint: str, job_ids: list[str]) -> None:
        answer = {"fingerprint": request_fingerprint, "state": "done", "job_ids": job_ids}
        self.redis.set(self._name(key, tenant), json.dumps(answer), ex=self.ttl)

    def release(self, key: str, tenant: str | None) -> None:
        """Forget a claim whose request created nothing (it was refused)."""
        self.redis.delete(self._name(key, tenant))
