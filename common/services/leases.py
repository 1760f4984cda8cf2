"""Leases on the members of a due set: a Redis sorted set of ids (webhook events, ended
batches), each scored with the time it is due to be handled, that every process running the
services loop handles from.

Semantics: ``claim(id, now, seconds)`` takes an id whose score is ``now`` or earlier by
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
and should take well within a lease, or ``renew`` it as it goes.

Claims are one id at a time, just before its work, so that a lease is spent on one piece of
work: a pass lists the ids due (``due``) and claims each in turn, skipping those another
process has claimed meanwhile.
"""

from __future__ import annotations

import redis

_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def due(client: redis.Redis, key: str, now: float, limit: int) -> list[str]:
    """Up to ``limit`` ids of due set ``key`` scored ``now`` or earlier, the earliest first
    (listed, not claimed)."""
    ids = client.zrangebyscore(key, "-inf", repr(now), start=0, num=limit)
    return [i.decode() if isinstance(i, bytes) else i for i in ids]


def claim(client: redis.Redis, key: str, id_: str, now: float, seconds: float) -> float | None:
    """Claim ``id_`` for ``seconds`` if it is due at ``now``; returns the claim's deadline (its
    token), or None when it is not due (another process holds it, or it is done)."""
    if seconds <= 0:
        raise ValueError(f"a lease lasts more than 0 seconds, not {seconds}")
    deadline = now + seconds
    taken = client.register_script(_CLAIM)(keys=[key], args=[id_, repr(now), repr(deadline)])
    return deadline if taken else None


_RENEW = """
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]) or '-1') ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def renew(
    client: redis.Redis, key: str, id_: str, deadline: float, now: float, seconds: float
) -> float | None:
    """Extend a claim of ``id_`` whose deadline is ``deadline`` to ``now + seconds`` (at least
    the deadline it had); returns the new deadline (the claim's token from now on), or None
    when the claim is no longer held (its lease ran out and another process took it, or the
    id was re-scored): its holder should stop."""
    extended = max(deadline, now + seconds)
    held = client.register_script(_RENEW)(keys=[key], args=[id_, repr(deadline), repr(extended)])
    return extended if held else None
