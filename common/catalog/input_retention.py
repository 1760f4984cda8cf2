"""How long input images are kept: while any kept job record names them, and a grace period
(LORAFLEET_INPUT_IMAGE_GRACE) after each upload while none does (a client uploads, then
submits). The bytes live in the object store (common/catalog/input_images.py); this module
keeps the books, in Redis and on Redis's clock (``keys`` lists the keys):

- ``keys.INPUTS_DUE``: each image kept track of (its sha256 hex), scored by when upkeep next
  looks whether it is still needed;
- ``keys.input_jobs(sha)``: the ids of the jobs that name it, scored by when they were named;
- ``keys.INPUTS_DELETING``: images whose object is being deleted now, scored by when a
  deletion cut short (its process died) is taken up again.

Semantics:
- ``uploaded(sha)``: the image is looked at no sooner than ``grace`` seconds from now.
- ``named(jobs)``: called by a submission just before it writes its records, one write for
  all its images: each image gets the ids of the jobs that name it. Returned: the images being
  deleted now (the submission must refuse them) and those not kept track of (deleted since,
  or stored before lorafleet kept track), which are kept ``grace`` from now and whose objects
  the caller checks.
- ``still_needed(sha)``, in upkeep: drops the ids of jobs whose records are gone and says
  whether any is left; if so the image is looked at again when the last of those records
  expires (a record that does not expire, a queued or running job's or one kept for good:
  RECHECK_SECONDS from now). A record missing although its job was named less than
  ``window`` = min(NAMING_SECONDS, record retention) ago is one still being written: no
  record expires sooner than the retention after its job was named.
- ``forget(sha)``: in one atomic step, and only if its time has passed and no job id is left
  (a submission or an upload meanwhile keeps it), the image leaves the books and is marked
  deleting; ``deleted(sha)`` unmarks it once its object is gone. While it is marked,
  ``uploaded`` answers False (the uploader waits for the deletion, then stores the bytes
  again) and ``named`` returns it as being deleted.

So no object is deleted while a job record that names it exists: a queued job's, one handed
back to the queue, a retry's (a new record naming the same images), a running job's, and an
ended job's until its record expires.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from lorafleet.common.schema import keys
from lorafleet.common.schema.inputs import IMAGE_REF
from lorafleet.common.schema.jobs import GenerationJob

RECHECK_SECONDS = 3600.0
"""How soon upkeep looks again at an image that a queued or running job names (its record does
not expire yet; once the job ends, its record's expiry says how long the image is kept)."""
NAMING_SECONDS = 60.0
"""How long a job id named without a record is taken for a submission still writing its
records (a submission names its images just before it writes them)."""
DELETE_HOLD_SECONDS = 300.0
"""How long an image stays marked deleting before upkeep takes a deletion cut short up again."""
CHUNK = 1000
"""Job ids sent to Redis in one command."""

_NOW = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: due, deleting. ARGV: sha, grace. 0 while the image is being deleted.
_UPLOADED = (
    _NOW
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local at = now + tonumber(ARGV[2])
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not old or tonumber(old) < at then redis.call('ZADD', KEYS[1], at, ARGV[1]) end
return 1
"""
)

# KEYS: due, deleting. ARGV: the job-ids key prefix, grace, chunk, JSON {sha: [job ids]}.
# Returns {being deleted, not kept track of}; nothing is written when any is being deleted.
_NAMED = (
    _NOW
    + """
local named = cjson.decode(ARGV[4])
local busy, fresh = {}, {}
for sha, _ in pairs(named) do
  if redis.call('ZSCORE', KEYS[2], sha) then table.insert(busy, sha) end
end
if #busy > 0 then return {busy, fresh} end
local chunk = tonumber(ARGV[3])
for sha, ids in pairs(named) do
  for i = 1, #ids, chunk do
    local pairs_ = {}
    for j = i, math.min(i + chunk - 1, #ids) do
      table.insert(pairs_, now)
      table.insert(pairs_, ids[j])
    end
    redis.call('ZADD', ARGV[1] .. sha, unpack(pairs_))
  end
  if not redis.call('ZSCORE', KEYS[1], sha) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), sha)
    table.insert(fresh, sha)
  end
end
return {busy, fresh}
"""
)

# KEYS: the image's job ids. ARGV: the record key prefix, window, recheck, job ids...
# Drops the ids whose records are gone; returns when the last record left expires ('-1': none).
_PRUNE = (
    _NOW
    + """
local latest = -1
for i = 4, #ARGV do
  local id = ARGV[i]
  local ttl = redis.call('PTTL', ARGV[1] .. id)
  local kept = nil
  if ttl == -1 then
    kept = now + tonumber(ARGV[3])
  elseif ttl >= 0 then
    kept = now + ttl / 1000
  else
    local named = redis.call('ZSCORE', KEYS[1], id)
    if named then
      if tonumber(named) + tonumber(ARGV[2]) > now then
        kept = tonumber(named) + tonumber(ARGV[2])
      else
        redis.call('ZREM', KEYS[1], id)
      end
    end
  end
  if kept and kept > latest then latest = kept end
end
return tostring(latest)
"""
)

# KEYS: due. ARGV: sha, when. Raises the time of an image still kept track of; never lowers it.
_LATER = """
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if old and tonumber(old) < tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
return 1
"""

# KEYS: due, the image's job ids, deleting. ARGV: sha, hold. 1: forgotten, now marked deleting.
_FORGET = (
    _NOW
    + """
local at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not at or tonumber(at) > now or redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def named_images(job: GenerationJob) -> list[tuple[str, str]]:
    """(field, sha256 hex) of each stored image ``job`` names: its init image, mask, ControlNet
    maps and IP-Adapter images (an http(s) URL is stored and named by sha256 at submit)."""
    given = [("init_image", job.init_image), ("mask_image", job.mask_image)]
    given += [(f"controlnets[{n}].image", spec.image) for n, spec in enumerate(job.controlnets)]
    if job.ip_adapter is not None:
        given += [(f"ip_adapter.images[{n}]", image) for n, image in enumerate(job.ip_adapter.images)]
    return [(field, ref.removeprefix("sha256:")) for field, ref in given if ref and IMAGE_REF.match(ref)]


class InputRetention:
    """The books of how long each input image is kept; safe to share between threads."""

    def __init__(self, client: redis.Redis, grace: float, record_retention: float) -> None:
        self.redis, self.grace = client, grace
        self.window = min(NAMING_SECONDS, record_retention)
        """A job id named this long ago whose record is missing is dropped (see the module)."""
        self._uploaded = client.register_script(_UPLOADED)
        self._named = client.register_script(_NAMED)
        self._prune = client.register_script(_PRUNE)
        self._later = client.register_script(_LATER)
        self._forget = client.register_script(_FORGET)

    def uploaded(self, sha: str) -> bool:
        """Keep image ``sha`` at least ``grace`` seconds from now; False (nothing written) while
        its object is being deleted."""
        return bool(self._uploaded(keys=[keys.INPUTS_DUE, keys.INPUTS_DELETING], args=[sha, self.grace]))

    def named(self, jobs: Sequence[GenerationJob]) -> tuple[dict[str, str], dict[str, str]]:
        """Add each job's id to the images it names (the jobs of one submission, their ids set).
        Returns (being deleted, not kept track of), each {sha: the first field naming it}
        (``jobs[n].`` before it when there are several); nothing is written if any is being deleted."""
        ids: dict[str, dict[str, None]] = {}
        fields: dict[str, str] = {}
        for n, job in enumerate(jobs):
            where = f"jobs[{n}]." if len(jobs) > 1 else ""
            for field, sha in named_images(job):
                assert job.job_id is not None, "a submission names its images once its jobs have ids"
                fields.setdefault(sha, where + field)
                ids.setdefault(sha, {})[job.job_id] = None
        if not ids:
            return {}, {}
        busy, fresh = self._named(
            keys=[keys.INPUTS_DUE, keys.INPUTS_DELETING],
            args=[
                keys.input_jobs(""),
                self.grace,
                CHUNK,
                json.dumps({sha: list(i) for sha, i in ids.items()}),
            ],
        )
        return {_text(s): fields[_text(s)] for s in busy}, {_text(s): fields[_text(s)] for s in fresh}

    def due(self, limit: int) -> list[str]:
        """Up to ``limit`` images whose time to be looked at has come, the longest due first."""
        now = self._now()
        return [_text(s) for s in self.redis.zrangebyscore(keys.INPUTS_DUE, "-inf", now, start=0, num=limit)]

    def still_needed(self, sha: str) -> bool:
        """Whether a job record that names ``sha`` is still kept (or being written); the ids of
        records gone are dropped, and the image is looked at again when the last one left expires."""
        key = keys.input_jobs(sha)
        latest, chunk = -1.0, []
        for member, _ in self.redis.zscan_iter(key, count=CHUNK):
            chunk.append(_text(member))
            if len(chunk) == CHUNK:
                latest, chunk = max(latest, self._kept_until(key, chunk)), []
        if chunk:
            latest = max(latest, self._kept_until(key, chunk))
        if latest < 0:
            return False
        self._later(keys=[keys.INPUTS_DUE], args=[sha, repr(latest)])
        return True

    def _kept_until(self, key: str, job_ids: list[str]) -> float:
        return float(self._prune(keys=[key], args=[keys.job(""), self.window, RECHECK_SECONDS, *job_ids]))

    def forget(self, sha: str) -> bool:
        """Take ``sha`` off the books and mark it deleting, if its time has passed and no job
        names it (atomically); False leaves it as it is."""
        return bool(
            self._forget(
                keys=[keys.INPUTS_DUE, keys.input_jobs(sha), keys.INPUTS_DELETING],
                args=[sha, DELETE_HOLD_SECONDS],
            )
        )

    def deleted(self, sha: str) -> None:
        """Its object is gone: ``sha`` is no longer marked deleting."""
        self.redis.zrem(keys.INPUTS_DELETING, sha)

    def cut_short(self, limit: int) -> list[str]:
        """Images marked deleting for DELETE_HOLD_SECONDS (the process deleting them died): their
        deletion is taken up again."""
        now = self._now()
        return [
            _text(s) for s in self.redis.zrangebyscore(keys.INPUTS_DELETING, "-inf", now, start=0, num=limit)
        ]

    def _now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6
