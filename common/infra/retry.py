"""The one retry policy: a TransientError is tried again with exponential backoff.

Semantics: attempt 1 runs at once; attempt n + 1 waits ``first_delay`` * 2^(n-1) seconds,
at most ``max_delay``; after ``attempts`` tries the last TransientError is raised as it
was. Any other error is raised at once. tenacity does the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from lorafleet.common.schema.errors import TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 1.0
"""Seconds before the second try."""
MAX_DELAY = 30.0
"""Longest wait between two tries."""


def with_retries(
    what: str,
    call: Callable[[], T],
    attempts: int,
    *,
    first_delay: float = FIRST_DELAY,
    max_delay: float = MAX_DELAY,
) -> T:
    """``call()``, tried up to ``attempts`` times while it raises TransientError."""

    def log(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0
        logger.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.1f s",
            what,
            state.attempt_number,
            attempts,
            exc,
            delay,
        )

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=first_delay, min=first_delay, max=max_delay),
        retry=retry_if_exception_type(TransientError),
        before_sleep=log,
        reraise=True,
    )
    return retrying(call)
