"""The one exception tree of lorafleet.

::

    LorafleetError                 anything lorafleet raises on purpose
    ├── ConfigError                settings or the environment are unusable (never a job's fault)
    ├── InvalidInput               input refused, never retried; names the field (or file) and
    │   │                            what is allowed (``field``, ``allowed``, ``problems``)
    │   ├── JobRejected            a job, or a field of one, at submit (or at the worker)
    │   ├── BadArgument            input that is not a job: a CLI argument, a name to register
    │   ├── FileRefused            a file that cannot be used: pickled, not safetensors, corrupt
    │   │                            header, over the size limit
    │   ├── ModelError             a model name that names nothing, or a folder that is no model
    │   ├── LoraError              a LoRA that cannot be used: unknown name, refused file, keys
    │   │                            or shapes that fit no layer of the model
    │   ├── VaeError               a VAE name that names nothing here, or a refused VAE file
    │   └── EmbeddingError         an embedding that names nothing here, is refused, or does not fit
    ├── TransientError             a service is unavailable for now (object store, broker, a
    │   │                            download): retried with backoff where it happens, and a job
    │   │                            that meets one runs again, up to ``job_attempts`` runs
    │   └── QueueFull              a model's queue holds ``max_queued_per_model`` jobs, or Redis
    │                                is full: submit again later (HTTP 429)
    ├── JobFailed                  the job ran and cannot finish: out of memory, corrupt object,
    │   │                            the store refused access
    │   └── ObjectMissing          an object the job needs is not in the store
    ├── DuplicateRequest           an idempotency key already used with another request, or
    │                                whose first request is still being handled (HTTP 409)
    ├── JobCancelled               the job was cancelled while it ran
    └── Superseded                 this run no longer owns the job (its worker was taken for
                                     lost and the job handed to another run): it stops
                                     without writing the record

Every message says what is wrong and what is allowed; an error raised while a job runs
carries the job's id (``job_id``). Callers translate only across a boundary: the resolver
turns a ModelError or LoraError into a JobRejected naming the job's field; the worker ends
the job failed with the message of any InvalidInput.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id

    def __str__(self) -> str:
        if self.job_id:
            return f"job {self.job_id}: {self.message}"
        return self.message


class ConfigError(LorafleetError):
    """Settings or the environment cannot work (a missing binary, an unreachable path)."""


class InvalidInput(LorafleetError):
    """Input refused: never retried.

    ``reason`` is what is wrong; ``field`` names the offending field, argument or file
    (``loras[1].name``, ``--family``, ``style.safetensors``); ``allowed`` says what would
    have been accepted. ``problems`` lists (field, message) for every bad field when
    several were found at once. The message puts the three together.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        allowed: str | None = None,
        job_id: str | None = None,
        problems: list[tuple[str, str]] | None = None,
    ) -> None:
        described = f"{message} (allowed: {allowed})" if allowed else message
        text = f"{field}: {described}" if field and not message.startswith(field) else described
        super().__init__(text, job_id=job_id)
        self.reason = message
        self.field = field
        self.allowed = allowed
        self.problems = problems if problems is not None else [(field or "input", described)]


class JobRejected(InvalidInput):
    """A job is refused: an invalid field, an unknown or incompatible model or LoRA."""

    @classmethod
    def of(cls, exc: InvalidInput, field: str) -> JobRejected:
        """``exc`` restated as a refusal of the job's ``field``."""
        return cls(exc.reason, field=field, allowed=exc.allowed)


class BadArgument(InvalidInput):
    """Input that is not a job is refused: a CLI argument, a name or source to register."""


class FileRefused(InvalidInput):
    """A file cannot be used: pickled, not safetensors, a corrupt header, too large."""


class ModelError(InvalidInput):
    """A model name names nothing here, or a folder is not a model lorafleet can load."""


class LoraError(InvalidInput):
    """A LoRA cannot be used: unknown name, a refused file, keys or shapes that fit no layer."""


class VaeError(InvalidInput):
    """A VAE name names nothing here, or its file is refused."""


class EmbeddingError(InvalidInput):
    """A textual-inversion embedding names nothing here, is refused, or does not fit the model."""


class TransientError(LorafleetError):
    """A service (storage, broker, a download) is unavailable for now: retried with backoff."""


class QueueFull(TransientError):
    """Nothing more can be queued now: the model's queue is at its cap, or Redis is full."""


class JobFailed(LorafleetError):
    """The job ran and cannot finish; its record ends failed with this message."""


class ObjectMissing(JobFailed):
    """An object is not in the store (only a real absence: never a refusal or a network error)."""


class DuplicateRequest(LorafleetError):
    """An idempotency key met again with another request, or while its first is in progress."""


class JobCancelled(LorafleetError):
    """The job was cancelled; the worker stops at the next step."""


class Superseded(LorafleetError):
    """This run of a job no longer owns its record: another run took the job over."""
