"""Base models by name: a registered name, a local diffusers folder, or a hub id.

A registered model is a diffusers pipeline folder under ``<home>/models/<name>``. Every
model has a key that names it on the queue (``lorafleet.model.<key>``): the registered
name, the absolute path of a folder given directly, or the hub id. Producers and workers
resolve the same way, so a worker started with ``--models NAME`` consumes exactly the
jobs submitted for NAME.

Reading a model's family and native size needs only its JSON configs, never torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from lorafleet.common.errors import ConfigError, JobRejected
from lorafleet.common.queue import queue_for
from lorafleet.common.settings import Settings
from lorafleet.common.state import PREFIX

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
}
"""Model family by the pipeline class in model_index.json."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model."""

    key: str
    path: Path | None = None
    hub_id: str | None = None
    family: str | None = None
    native_size: int | None = None
    cross_attention_dim: int | None = None

    @property
    def queue(self) -> str:
        return queue_for(self.key)

    @property
    def source(self) -> str:
        """What from_pretrained loads: the folder, or the hub id."""
        return str(self.path) if self.path else str(self.hub_id)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe_folder(key: str, folder: Path) -> ModelRef:
    """Family, native size and cross-attention width of a diffusers pipeline folder."""
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    family = FAMILY_BY_PIPELINE.get(index.get("_class_name", ""))
    native = None
    if unet.get("sample_size") and vae.get("block_out_channels"):
        native = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    cross = unet.get("cross_attention_dim")
    return ModelRef(
        key=key,
        path=folder,
        family=family,
        native_size=native,
        cross_attention_dim=cross if isinstance(cross, int) else None,
    )


def is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


REGISTERED_KEY = PREFIX + "registry:models"
"""Redis hash: model name -> JSON {source, family, native_size, cross_attention_dim}."""


class ModelRegistry:
    """Resolves what a job's ``model`` field names.

    A name is looked up in the home's ``models/`` folder first, then (given a Redis client)
    among the models registered with `lorafleet models add`, which every producer and worker
    on the broker shares.
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.folder = settings.models_dir
        self.redis = client

    def local_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if is_pipeline_folder(p))

    def names(self) -> list[str]:
        return sorted(set(self.local_names()) | set(self.registered()))

    def registered(self) -> dict[str, dict]:
        if self.redis is None:
            return {}
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(REGISTERED_KEY).items()}

    def register(self, name: str, source: str, family: str | None = None) -> ModelRef:
        """Register ``name`` for every machine: a folder (as the workers see it) or a hub id."""
        if self.redis is None:
            raise ConfigError(
                "registering a model needs a broker (LORAFLEET_BROKER_URL or the embedded Redis)"
            )
        if not _NAME.match(name):
            raise JobRejected(
                f"{name!r} is not a model name",
                field="NAME",
                allowed="letters, digits, '.', '_' and '-', starting with a letter or digit",
            )
        path = Path(source).expanduser()
        if is_pipeline_folder(path):
            described = describe_folder(name, path.absolute())
            ref = replace(described, family=family or described.family)
        elif path.is_absolute():
            ref = ModelRef(key=name, path=path, family=family)  # a folder on the workers, not here
        elif HUB_ID.match(source):
            ref = ModelRef(key=name, hub_id=source, family=family)
        else:
            raise JobRejected(
                f"{source!r} is neither a diffusers pipeline folder nor a hub id",
                field="SOURCE",
                allowed="an absolute folder path (as the workers see it) or owner/name",
            )
        entry = {
            "source": ref.source,
            "family": ref.family,
            "native_size": ref.native_size,
            "cross_attention_dim": ref.cross_attention_dim,
        }
        self.redis.hset(REGISTERED_KEY, name, json.dumps(entry))
        return ref

    def unregister(self, name: str) -> bool:
        return bool(self.redis is not None and self.redis.hdel(REGISTERED_KEY, name))

    def _registered_ref(self, name: str) -> ModelRef | None:
        raw = self.redis.hget(REGISTERED_KEY, name) if self.redis is not None and _NAME.match(name) else None
        if raw is None:
            return None
        entry = json.loads(raw)
        source = entry["source"]
        if source.startswith("/"):
            path = Path(source)
            if is_pipeline_folder(path):  # this machine sees the folder: read what it says
                described = describe_folder(name, path)
                return replace(described, family=described.family or entry.get("family"))
            return ModelRef(
                key=name,
                path=path,
                family=entry.get("family"),
                native_size=entry.get("native_size"),
                cross_attention_dim=entry.get("cross_attention_dim"),
            )
        return ModelRef(
            key=name,
            hub_id=source,
            family=entry.get("family"),
            native_size=entry.get("native_size"),
            cross_attention_dim=entry.get("cross_attention_dim"),
        )

    def resolve(self, ref: str, *, field: str = "model") -> ModelRef:
        """The model ``ref`` names, or JobRejected saying what would have been accepted."""
        if _NAME.match(ref) and is_pipeline_folder(self.folder / ref):
            return describe_folder(ref, self.folder / ref)
        registered = self._registered_ref(ref)
        if registered is not None:
            return registered
        path = Path(ref).expanduser()
        if is_pipeline_folder(path):
            path = path.absolute()
            if path.parent == self.folder.absolute():
                return describe_folder(path.name, path)
            return describe_folder(str(path), path)
        if HUB_ID.match(ref) and not path.exists():
            return ModelRef(key=ref, hub_id=ref)
        registered = (
            ", ".join(self.names())
            or f"none yet: put pipeline folders in {self.folder} or run lorafleet models add"
        )
        if path.exists():
            problem = f"{ref!r} is a path but not a diffusers pipeline folder (no model_index.json)"
        else:
            problem = f"unknown model {ref!r}"
        raise JobRejected(
            problem,
            field=field,
            allowed=f"a registered model ({registered}), a diffusers pipeline folder, or a hub id owner/name",
        )
