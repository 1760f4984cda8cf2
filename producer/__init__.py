"""lorafleet.producer: submitting and watching jobs (never imports torch).

The public SDK is re-exported here; ``tests/producer/test_public_api.py`` pins it.
"""

from lorafleet.common.schema.errors import (
    ConfigError,
    JobCancelled,
    JobFailed,
    JobRejected,
    LorafleetError,
    TransientError,
)
from lorafleet.common.schema.jobs import GenerationJob, JobRecord, JobStatus, LoraSpec, Priority, Sampler
from lorafleet.common.schema.settings import Settings
from lorafleet.producer.client import Client
from lorafleet.producer.submit import JobHandle

__all__ = [
    "Client",
    "ConfigError",
    "GenerationJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobRecord",
    "JobRejected",
    "JobStatus",
    "LoraSpec",
    "LorafleetError",
    "Priority",
    "Sampler",
    "Settings",
    "TransientError",
]
