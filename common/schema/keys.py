"""Every Redis key lorafleet uses, named in one place.

lorafleet's own keys all start with ``lorafleet:``; Celery's queue lists start with
``lorafleet.model.`` (a dot: they are Celery queue names, which KEDA and Flower read)::

    key                                   type    holds
    lorafleet:job:<job_id>                string  the JobRecord as JSON; expires ``record_retention``
                                                  s after the job ends
    lorafleet:jobs                        zset    every job id, scored by submit time
    lorafleet:status:<status>             zset    job ids in that status (queued, running, ...)
    lorafleet:batch:<batch_id>            zset    a batch's job ids, scored by submit time
    lorafleet:model:<model_key>           zset    a base model's job ids, scored by submit time
    lorafleet:models                      set     model keys jobs were ever submitted for
    lorafleet:tenant:<tenant>             zset    a tenant's job ids, scored by submit time
    lorafleet:tenants                     set     tenants that submitted jobs
    lorafleet:unsent                      zset    job ids whose record is written but whose message is not
                                                  sent yet, scored by submit time (a producer that died
                                                  between the two leaves them; upkeep sends them)
    lorafleet:events                      stream  one entry per record change: {job_id, batch_id, status,
                                                  step, total, tenant}; about EVENTS_KEPT entries
                                                  (GET /v1/events, Client.watch, Client.wait)
    lorafleet:scratch:<uuid>              zset    a listing's intersection of indexes, deleted in
                                                  the same transaction that builds it
    lorafleet:registry:models             hash    model name -> JSON {source, family, native_size,
                                                  cross_attention_dim} (`lorafleet models add`)
    lorafleet:loras                       hash    LoRA name -> JSON LoraInfo, its path the object
                                                  key (`lorafleet loras import`)
    lorafleet:embeddings                  hash    embedding name -> JSON {sha256, object_key, size,
                                                  meta} (`lorafleet embeddings import`)
    lorafleet:vaes                        hash    VAE name -> the same (`lorafleet vaes import`)
    lorafleet:controlnets                 hash    ControlNet name -> the same (`lorafleet controlnets import`)
    lorafleet:upscalers                   hash    upscaler name -> the same (`lorafleet upscalers import`)
    lorafleet:workers                     hash    worker name -> JSON WorkerBeat (heartbeats)
    lorafleet:idempotency:<scope>:<sha256>  string  a submit's idempotency key (its sha256), per tenant
                                                  (scope "-": operators): JSON {fingerprint, state,
                                                  job_ids}; expires LORAFLEET_IDEMPOTENCY_SECONDS
    lorafleet:webhook:<event_id>          string  a webhook event: JSON {id, url, payload, created, state,
                                                  attempts: [{at, status, error}]}; kept a week
    lorafleet:batch-end:<batch_id>        hash    the batch-end tracker: {total: jobs submitted into the
                                                  batch, ended: those that ended}, both counted in the
                                                  atomic step that creates or ends a record
    lorafleet:batches:ended               zset    batches whose every job has ended, waiting for their
                                                  consumers (batch webhook, sweep grid), scored by when
                                                  (a batch being handled: the end of its lease)
    lorafleet:batch-webhook:<batch_id>    hash    a batch's webhook: {url}
    lorafleet:sweep:<batch_id>            string  a sweep's layout (common/services/sweeps.py)
    lorafleet:webhooks:due                zset    event ids waiting for a delivery, scored by when
                                                  (a delivery in progress: the end of its lease)
    lorafleet:session:<sha256 of its id>  string  a dashboard session: the sha256 of the token that
                                                  opened it; expires after 30 days, deleted at log out
    lorafleet:handback:<job_id>:<run_id>  string  held (NX, 5 min) by the one process that hands
                                                  a lost worker's run back to the queue
    lorafleet:upkeep:lease                string  the process that runs upkeep now (hand-back, unsent
                                                  messages, index trimming, input images); expires unless renewed
    lorafleet:inputs:due                  zset    every input image lorafleet keeps track of (its sha256 hex),
                                                  scored by when upkeep next looks whether it is still needed
                                                  (Redis's clock; common/catalog/input_retention.py)
    lorafleet:input-jobs:<sha256>         zset    the ids of the jobs that name that input image, scored by
                                                  when they were named (pruned as their records expire)
    lorafleet:inputs:deleting             zset    input images being deleted from the object store now, scored
                                                  by when a deletion cut short is taken up again
    lorafleet:alive:<worker name>         string  the worker process's instance, set at every beat to
                                                  expire after FORGET_AFTER: its age is read from its
                                                  TTL, on Redis's clock, never a machine's
    lorafleet:stats:finished              hash    final status -> jobs that ended so
    lorafleet:stats:phases                hash    "<phase>:sum" / "<phase>:count" -> seconds / jobs
    lorafleet:stats:lora                  hash    hits / misses of the workers' LoRA caches
    lorafleet:stats:images:<minute>       string  images stored in that epoch minute; 2 h TTL
    lorafleet:stats:model-images:<model>:<minute>  string  the same per base model; 2 h TTL

    lorafleet.model.<model_key>           list    Celery messages of priority step 0 (high)
    lorafleet.model.<model_key>\\x06\\x16<n> list    the same queue's step n = 3 (normal), 6 (low), 9

Celery's Redis transport also keeps its own bookkeeping, which lorafleet never writes:
``unacked`` and ``unacked_index`` (messages taken but not yet acknowledged, restored to
their queue after the visibility timeout) and ``_kombu.binding.<queue>``.

Records change only through ``fleet.lifecycle``: one server-side script per transition
writes the record, moves its status index, adds its event and, when the job ends, every
effect of its end (counters, webhook event, batch-end count) in the same atomic step; the
counters are INCRBY/HINCRBYFLOAT, so any number of workers add to them at once.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "lorafleet:"
"""Every key lorafleet itself writes starts with this."""

ALL_JOBS = PREFIX + "jobs"
MODELS_WITH_JOBS = PREFIX + "models"
TENANTS_WITH_JOBS = PREFIX + "tenants"
UNSENT = PREFIX + "unsent"
REGISTERED_MODELS = PREFIX + "registry:models"
REGISTERED_LORAS = PREFIX + "loras"
REGISTERED_EMBEDDINGS = PREFIX + "embeddings"
REGISTERED_VAES = PREFIX + "vaes"
REGISTERED_CONTROLNETS = PREFIX + "controlnets"
REGISTERED_UPSCALERS = PREFIX + "upscalers"
WORKERS = PREFIX + "workers"
STATS_FINISHED = PREFIX + "stats:finished"
STATS_PHASES = PREFIX + "stats:phases"
STATS_LORA = PREFIX + "stats:lora"
STATS_IMAGES_TTL = 2 * 3600
"""Seconds a per-minute image counter is kept."""

QUEUE_PREFIX = "lorafleet.model."
"""Celery queue of base model M is QUEUE_PREFIX + M's key (made safe)."""
PRIORITY_STEPS = (0, 3, 6, 9)
"""Celery's Redis priority lists (kombu's default steps; KEDA and Flower count the same)."""
PRIORITY_SEPARATOR = "\x06\x16"
"""Between a queue's name and its priority step in the Redis list's key (kombu's default)."""

_UNSAFE_IN_QUEUE = re.compile(r"[^A-Za-z0-9._:/-]")


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def status(value: str) -> str:
    """The index of job ids in status ``value`` (``queued``, ``running``, ...)."""
    return f"{PREFIX}status:{value}"


def batch(batch_id: str) -> str:
    return f"{PREFIX}batch:{batch_id}"


def model_jobs(model_key: str) -> str:
    return f"{PREFIX}model:{model_key}"


def handback(job_id: str, run_id: str) -> str:
    """Taken (SET NX) by whichever process hands this run of a job back to the queue."""
    return f"{PREFIX}handback:{job_id}:{run_id}"


def tenant_jobs(tenant: str) -> str:
    """The index of one tenant's job ids (``LORAFLEET_API_TOKENS`` names the tenants)."""
    return f"{PREFIX}tenant:{tenant}"


def idempotency(scope: str, digest: str) -> str:
    """A submit's idempotency key, by the sha256 of the key, within a tenant's scope."""
    return f"{PREFIX}idempotency:{scope}:{digest}"


WEBHOOKS_DUE = PREFIX + "webhooks:due"
BATCHES_ENDED = PREFIX + "batches:ended"
UPKEEP_LEASE = PREFIX + "upkeep:lease"
INPUTS_DUE = PREFIX + "inputs:due"
INPUTS_DELETING = PREFIX + "inputs:deleting"
INPUT_JOBS = PREFIX + "input-jobs:"
"""An input image's job ids are INPUT_JOBS + its sha256 hex (``input_jobs``)."""


def input_jobs(sha: str) -> str:
    """The ids of the jobs that name input image ``sha`` (hex), scored by when they were named."""
    return INPUT_JOBS + sha


def batch_end(batch_id: str) -> str:
    """A batch's end tracker: hash {total, ended}."""
    return f"{PREFIX}batch-end:{batch_id}"


def worker_alive(name: str) -> str:
    """Worker ``name``'s liveness: its instance, expiring FORGET_AFTER after its last beat."""
    return f"{PREFIX}alive:{name}"


def sweep(batch_id: str) -> str:
    """A sweep's layout: JSON {axes: [{axis, labels}], prefix, grids: [keys]}."""
    return f"{PREFIX}sweep:{batch_id}"


def batch_webhook(batch_id: str) -> str:
    """A batch's webhook: hash {url}."""
    return f"{PREFIX}batch-webhook:{batch_id}"


EVENTS = PREFIX + "events"
EVENTS_KEPT = 100_000
"""Entries the event stream keeps (trimmed approximately as it grows)."""


def webhook_event(event_id: str) -> str:
    return f"{PREFIX}webhook:{event_id}"


def session(digest: str) -> str:
    """A dashboard session, by the sha256 of the id its cookie carries."""
    return f"{PREFIX}session:{digest}"


def scratch(token: str) -> str:
    return f"{PREFIX}scratch:{token}"


def model_images_in_minute(model: str, minute: int) -> str:
    """Images stored for base model ``model`` in epoch minute ``minute`` (estimates of a start)."""
    return f"{PREFIX}stats:model-images:{model}:{minute}"


def images_in_minute(minute: int) -> str:
    """Images stored in epoch minute ``minute``."""
    return f"{PREFIX}stats:images:{minute}"


def queue(model_key: str) -> str:
    """The Celery queue (and its step-0 Redis list) of one base model; one queue per key: a
    key with characters a queue name cannot hold gets them replaced and a hash of the key
    appended (``my model`` and ``my_model`` never share a queue)."""
    safe = _UNSAFE_IN_QUEUE.sub("_", model_key)
    if safe != model_key:
        safe += "::" + hashlib.sha256(model_key.encode()).hexdigest()[:10]
    return QUEUE_PREFIX + safe


def priority_lists(queue_name: str) -> list[str]:
    """The Redis list keys that hold ``queue_name``'s messages, one per priority step."""
    return [queue_name if step == 0 else f"{queue_name}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]
