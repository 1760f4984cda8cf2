"""Webhooks: a job that names ``webhook_url`` is POSTed an event when it ends, and a batch
submitted with ``batch_webhook_url`` one ``batch.ended`` event when its last job has ended.

The event follows the Standard Webhooks specification: a JSON body ``{"type":
"job.succeeded" | "job.failed" | "job.cancelled", "timestamp", "data": {...the record's
summary and image URIs}}`` with the ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` headers, signed (HMAC-SHA256) by the ``standardwebhooks`` package with
LORAFLEET_WEBHOOK_SECRET (``whsec_`` and base64, as the specification writes secrets).

Delivery is at least once, from a durable outbox in Redis (``keys.webhook_event``,
``keys.WEBHOOKS_DUE``): a job's event is written in the atomic step that ends the job
(fleet/lifecycle.py), a batch's by services/batches.py, each once (the event id is the job's
or the batch's), and every process that runs the services loop (live workers, the API)
delivers the events that are due. A process claims one event at a time, just before it
POSTs it, for a lease of LEASE_SECONDS (services/leases.py), long enough for one attempt:
while the lease holds, no other process delivers the event, and one that dies mid-delivery
leaves it to the next when the lease runs out. The attempt's outcome is written only if the
lease still holds once it is known (one server-side script checks and writes), so a holder
whose lease ran out (it stalled, or its receiver answered after LEASE_SECONDS) never
overwrites the next holder's outcome: it records nothing and logs its attempt instead, and
the next holder POSTs the event again, perhaps while the late one is still at it. A
receiver may therefore get an event more than once, and should dedupe by its ``webhook-id``.
A failed attempt (connection error, timeout, a status other than 2xx) is recorded
with its time, status and error, and tried again after 10 s, 20 s, 40 s ... up to an hour
apart, until LORAFLEET_WEBHOOK_MAX_SECONDS after the event (a day by default); then it is
given up and says so. Restarting the API or every worker loses nothing: the outbox is in Redis.

``webhook_url`` must be http(s); a host on a loopback, private, link-local or otherwise
non-public address is refused at submit, and again at every delivery (its name may resolve
elsewhere by then), unless LORAFLEET_WEBHOOK_ALLOW_PRIVATE is set: a submitter cannot make
the fleet call into its own network.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import redis

from lorafleet.common.fleet.lifecycle import WEBHOOK_KEEP_SECONDS, event_id, outbox_entry
from lorafleet.common.infra.net import checked_address, send_pinned
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import ConfigError, JobRejected
from lorafleet.common.services import leases

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
"""Seconds a receiver has for each step of one delivery (connect, send, each read of the answer)."""
ATTEMPT_SECONDS = 30.0
"""Seconds a receiver has for the whole of one attempt, its answer read to the end."""
LEASE_SECONDS = 60.0
"""How long a process holds the one event it is delivering: an attempt of at most
ATTEMPT_SECONDS, the address lookup and the outcome's write, with room to spare."""
FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 3600.0
BATCH = 20
"""Events one pass of the services loop delivers at most (each claimed in turn)."""
KEEP_SECONDS = WEBHOOK_KEEP_SECONDS
"""How long an event and its attempts stay readable after it was delivered or given up."""

_QUEUE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

_RECORD = f"""
if not ({leases.HELD}) then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
if ARGV[5] == '' then redis.call('ZREM', KEYS[1], ARGV[1]) else redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1]) end
return 1
"""
"""An attempt's outcome: the event written, and off the due set or due again at ARGV[5], if
the claim whose deadline is ARGV[2] still holds it (services/leases.py)."""


def check_url(url: str, allow_private: bool, field: str = "webhook_url") -> str | None:
    """JobRejected unless ``url`` is an http(s) URL to a public host (or private ones are
    allowed); returns the public address checked, the one to deliver to (None when private
    hosts are allowed: then nothing is looked up here)."""
    parts = urlsplit(url)
    allowed = "an http(s) URL of a public host (or set LORAFLEET_WEBHOOK_ALLOW_PRIVATE)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobRejected(f"{url[:80]!r} is not an http(s) URL", field=field, allowed=allowed)
    if allow_private:
        return None
    return checked_address(url, error=JobRejected, field=field, allowed=allowed)


def queue_event(client: redis.Redis, id_: str, url: str, payload: dict[str, Any]) -> bool:
    """Put an event in the outbox unless one with its id is there already (True if queued)."""
    now = time.time()
    entry = outbox_entry(id_, url, payload, now)
    queued = client.register_script(_QUEUE)(
        keys=[keys.webhook_event(id_), keys.WEBHOOKS_DUE], args=[entry, KEEP_SECONDS, now, id_]
    )
    return bool(queued)


def read_event(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.get(keys.webhook_event(event_id(job_id)))
    return json.loads(raw) if raw else None


class WebhookSender:
    """Delivers due events from the outbox; one per process that runs the services loop."""

    def __init__(
        self, client: redis.Redis, secret: str | None, allow_private: bool, max_seconds: float
    ) -> None:
        self.redis = client
        self.secret = secret
        self.allow_private = allow_private
        self.max_seconds = max_seconds

    def deliver_due(self, now: float | None = None) -> int:
        """Deliver up to BATCH events due at ``now`` (default: the time), each claimed just
        before its delivery, at ``now`` plus the seconds the pass has taken so far; returns
        how many the receivers took."""
        if self.secret is None:
            return 0
        delivered = 0
        for claim in leases.claim_each(self.redis, keys.WEBHOOKS_DUE, now, BATCH, LEASE_SECONDS):
            delivered += self._deliver(claim.id, claim.deadline)  # others: another process's now
        return delivered

    def _deliver(self, event_id_: str, deadline: float) -> bool:
        """One attempt at an event claimed until ``deadline``, its outcome written if the claim
        still holds; True if the receiver took it."""
        name = keys.webhook_event(event_id_)
        raw = self.redis.get(name)  # read under the claim: no earlier holder writes it any more
        if raw is None:
            self.redis.zrem(keys.WEBHOOKS_DUE, event_id_)
            return False
        event = json.loads(raw)
        status, error = self._post(event)
        event["attempts"].append({"at": time.time(), "status": status, "error": error})
        tries = len(event["attempts"])
        ok = status is not None and 200 <= status < 300
        again = None  # seconds until the next attempt; None: no more
        if ok:
            event["state"] = "delivered"
        elif time.time() - event["created"] >= self.max_seconds:
            event["state"] = "given up"
        else:
            again = min(FIRST_RETRY_SECONDS * 2 ** (tries - 1), MAX_RETRY_SECONDS)
        next_at = "" if again is None else repr(time.time() + again)
        recorded = self.redis.register_script(_RECORD)(
            keys=[keys.WEBHOOKS_DUE, name],
            args=[event_id_, repr(deadline), json.dumps(event), KEEP_SECONDS, next_at],
        )
        if not recorded:
            logger.warning(
                "webhook %s: attempt %d (%s) outlived its lease of %s s: not recorded, another "
                "process has the event now",
                event_id_,
                tries,
                error or f"HTTP {status}",
                LEASE_SECONDS,
            )
        elif ok:
            logger.info("webhook %s delivered to %s (attempt %d)", event_id_, event["url"], tries)
        elif again is None:
            logger.warning("webhook %s given up after %d attempts: %s", event_id_, tries, error)
        else:
            logger.info("webhook %s attempt %d failed (%s); again in %.0f s", event_id_, tries, error, again)
        return ok

    def _post(self, event: dict[str, Any]) -> tuple[int | None, str | None]:
        """(HTTP status, error) of one signed POST of the event."""
        import httpx
        from standardwebhooks import Webhook

        url = event["url"]
        try:  # looked up once, here, and connected to: the name may resolve elsewhere by now
            address = check_url(url, self.allow_private) or checked_address(
                url, error=JobRejected, field="webhook_url", allow_private=True
            )
        except JobRejected as exc:
            return None, exc.message
        body = json.dumps(event["payload"])
        sent_at = datetime.now(timezone.utc)
        try:
            signature = Webhook(self.secret).sign(event["id"], sent_at, body)
        except Exception as exc:  # a secret that is not base64
            raise ConfigError(f"LORAFLEET_WEBHOOK_SECRET cannot sign: {exc}") from None
        headers = {
            "content-type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signature,
        }
        http = httpx.Client(timeout=TIMEOUT_SECONDS)
        answer: list[httpx.Response | BaseException] = []

        def post() -> None:
            try:
                answer.append(send_pinned(http, "POST", url, address, content=body, headers=headers))
            except BaseException as exc:  # noqa: BLE001  (handed to the caller below)
                answer.append(exc)

        # httpx bounds each step (connect, write, each read), not a whole request: a receiver
        # trickling its answer could hold an attempt past its lease, and the attempt would go
        # unrecorded. The POST runs beside this thread, which stops waiting at ATTEMPT_SECONDS
        # and closes the client under it (its next read fails; it ends by itself).
        worker = threading.Thread(target=post, name="lorafleet-webhook-post", daemon=True)
        worker.start()
        worker.join(ATTEMPT_SECONDS)
        http.close()
        if not answer:
            return None, f"no whole answer within {ATTEMPT_SECONDS:g} s"
        response = answer[0]
        if isinstance(response, httpx.HTTPError):
            return None, f"{type(response).__name__}: {response}"
        if isinstance(response, BaseException):
            raise response
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"


def webhook_sender(settings, client: redis.Redis) -> WebhookSender:
    """The sender an upkeep process uses, from LORAFLEET_WEBHOOK_* settings."""
    return WebhookSender(
        client, settings.webhook_secret, settings.webhook_allow_private, settings.webhook_max_seconds
    )
