"""The one exception tree of lorafleet.

::

    LorafleetError                 anything lorafleet raises on purpose
    ├── ConfigError                settings or the environment are unusable (never a job's fault)
    ├── JobRejected                bad input, refused at submit or at the worker, never retried
    │   └── (field, allowed)         names the field and what is allowed
    ├── TransientError             a service is unavailable for now; retried with backoff
    ├── JobFailed                  the job ran and could not finish: out of memory, corrupt file
    └── JobCancelled               the job was cancelled while it ran

Every message says what is wrong and what is allowed; an error raised while a job runs
carries the job's id (``job_id``).
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


class JobRejected(LorafleetError):
    """Bad input: an invalid field, an unknown or incompatible model or LoRA. Never retried.

    ``field`` names the offending field (``loras[1].name``, ``width``); ``allowed`` says
    what would have been accepted. ``problems`` lists (field, message) for every bad field
    when several were found at once.
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
        text = message
        if field and not message.startswith(field):
            text = f"{field}: {message}"
        if allowed:
            text = f"{text} (allowed: {allowed})"
        super().__init__(text, job_id=job_id)
        self.field = field
        self.allowed = allowed
        self.problems = problems if problems is not None else [(field or "job", text)]


class TransientError(LorafleetError):
    """A service (storage, broker, a LoRA download) is unavailable for now; retry later."""


class JobFailed(LorafleetError):
    """The job ran and cannot finish; its record ends failed with this message."""


class JobCancelled(LorafleetError):
    """The job was cancelled; the worker stops at the next step."""
