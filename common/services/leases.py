"""Leases on the members of a due set: a Redis sorted set of ids (webhook events, ended
batches), each scored with the time it is due to be handled, that every process running the
services loop handles from.

Semantics: a claim takes an id whose score is ``now`` or earlier by
scoring it ``now + seconds``, the claim's deadline: the claimer holds the id until then, and
after it the id is due again and any process may claim it. The deadline is the claim's
token. A later claim of the same id needs the earlier deadline passed and adds a lease of
more than zero to it, so every claim's deadline is greater than those before it: "the id's
score is still my deadline" is true of the last claim alone. A holder checks that in the
same server-side script as each write it makes under the lease, so that a holder whose
lease ran out never overwrites what the next one wrote. Anything else that scores the id
anew (a retry's back-off, a batch that ended again) ends the lease the same way. Deadlines
are on the claimers' clocks: a process whose clock runs ahead takes leases over that much
early.

What a lease does not do: stop its holder. A holder that outlives its lease (it stalled, or
its work took longer than the lease) goes on with its work while the next holder does the
same work; only its writes are refused. The work is done at least once, not exactly once,
and should take well within a lease, or renew it as it goes (``Claim.keep``).

Claims are one id at a time, just before its work, so that a lease is spent on one piece of
work: a pass lists the ids due and claims each in turn (``claim_each``), skipping those
another process has claimed meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
HELD = "tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '-1') == tonumber(ARGV[2])"
"""Lua: the claim of id ARGV[1] in due set KEYS[1] whose deadline is ARGV[2] still holds (a
holder's write checks it in the same script)."""
_RENEW = f"""
if not ({HELD}) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


class LeaseLost(Exception):
    """The id being handled is another process's now: its handling stops."""


@dataclass
class Claim:
    """A claim on one id of a due set, until ``deadline`` (its token) on ``clock``'s time."""

    client: redis.Redis
    key: str
    id: str
    deadline: float
    seconds: float
    clock: Callable[[], float]

    def keep(self) -> None:
        """Renew the lease once half of it has passed (long work calls this as it goes);
        LeaseLost once another process holds the id, or it was re-scored."""
        now = self.clock()
        if now < self.deadline - self.seconds / 2:
            return
        extended = max(self.deadline, now + self.seconds)
        renew = self.client.register_script(_RENEW)
        if not renew(keys=[self.key], args=[self.id, repr(self.deadline), repr(extended)]):
            raise LeaseLost(f"{self.id}: its lease ran out and another process holds it")
        self.deadline = extended


def claim_each(
    client: redis.Redis, key: str, now: float | None, limit: int, seconds: float
) -> Iterator[Claim]:
    """Claims, one at a time, of up to ``limit`` ids of due set ``key`` due at ``now`` (default:
    the time), each for ``seconds`` from the moment it is claimed: ``now`` plus the time taken
    since (so a caller's ``now`` in the future stays in the future). Ids another process has
    claimed meanwhile are skipped."""
    if seconds <= 0:
        raise ValueError(f"a lease lasts more than 0 seconds, not {seconds}")
    start, began = time.time() if now is None else now, time.monotonic()

    def clock() -> float:
        return start + time.monotonic() - began

    ids = client.zrangebyscore(key, "-inf", repr(start), start=0, num=limit)
    for raw in ids:
        id_ = raw.decode() if isinstance(raw, bytes) else raw
        at = clock()
        taken = client.register_script(_CLAIM)(keys=[key], args=[id_, repr(at), repr(at + seconds)])
        if taken:
            yield Claim(client, key, id_, at + seconds, seconds, clock)
