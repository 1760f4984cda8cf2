"""Base models by name: a registered name, a local diffusers folder, or a hub id.

A model in ``<home>/models/<name>`` is a diffusers pipeline folder. Every model has a key
that names it on the queue (``keys.queue(key)``): the name, the absolute path of a folder
given directly, or the hub id. Producers and workers resolve the same way, so a worker
started with ``--models NAME`` consumes exactly the jobs submitted for NAME.

Reading a model's family and native size needs only its JSON configs, never torch; a
config that is not valid JSON is a ModelError naming the file, not a model of unknown family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from lorafleet.common import keys
from lorafleet.common.errors import BadArgument, ConfigError, ModelError
from lorafleet.common.family import Family, pipeline_family
from lorafleet.common.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_ALLOWED = "letters, digits, '.', '_' and '-', starting with a letter or digit"


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model."""

    key: str
    path: Path | None = None
    hub_id: str | None = None
    family: Family | None = None
    native_size: int | None = None
    cross_attention_dim: int | None = None
    prediction_type: str | None = None

    @property
    def queue(self) -> str:
        return keys.queue(self.key)

    @property
    def source(self) -> str:
        """What from_pretrained loads: the folder, or the hub id."""
        return str(self.path) if self.path else str(self.hub_id)

    def entry(self) -> dict:
        """What the registry keeps in Redis for this model."""
        return {
            "source": self.source,
            "family": self.family.value if self.family else None,
            "native_size": self.native_size,
            "cross_attention_dim": self.cross_attention_dim,
            "prediction_type": self.prediction_type,
        }


def _config(path: Path, *, required: bool = False) -> dict:
    """A JSON config of the folder; {} if it is absent and not required; ModelError if corrupt."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ModelError(f"{path} is missing") from None
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def describe_folder(key: str, folder: Path) -> ModelRef:
    """Family, native size, cross-attention width and prediction type of a pipeline folder."""
    index = _config(folder / "model_index.json", required=True)
    unet = _config(folder / "unet" / "config.json")
    vae = _config(folder / "vae" / "config.json")
    scheduler = _config(folder / "scheduler" / "scheduler_config.json")
    cross = unet.get("cross_attention_dim")
    cross = cross if isinstance(cross, int) else None
    native = None
    if isinstance(unet.get("sample_size"), int) and isinstance(vae.get("block_out_channels"), list):
        native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type")
    return ModelRef(
        key=key,
        path=folder,
        family=pipeline_family(str(index.get("_class_name", "")), cross),
        native_size=native,
        cross_attention_dim=cross,
        prediction_type=prediction if isinstance(prediction, str) else None,
    )


def is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _from_entry(name: str, entry: dict) -> ModelRef:
    source = entry["source"]
    known = {
        "family": Family.parse(entry.get("family")),
        "native_size": entry.get("native_size"),
        "cross_attention_dim": entry.get("cross_attention_dim"),
        "prediction_type": entry.get("prediction_type"),
    }
    if source.startswith("/"):
        path = Path(source)
        if is_pipeline_folder(path):  # this machine sees the folder: read what it says
            described = describe_folder(name, path)
            return replace(described, family=described.family or known["family"])
        return ModelRef(key=name, path=path, **known)
    return ModelRef(key=name, hub_id=source, **known)


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
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(keys.REGISTERED_MODELS).items()}

    def register(self, name: str, source: str, family: Family | None = None) -> ModelRef:
        """Register ``name`` for every machine: a folder (as the workers see it) or a hub id."""
        if self.redis is None:
            raise ConfigError(
                "registering a model needs a broker (LORAFLEET_BROKER_URL or the embedded Redis)"
            )
        if not NAME.match(name):
            raise BadArgument(f"{name!r} is not a model name", field="NAME", allowed=NAME_ALLOWED)
        path = Path(source).expanduser()
        if is_pipeline_folder(path):
            described = describe_folder(name, path.absolute())
            ref = replace(described, family=family or described.family)
        elif path.is_absolute():
            ref = ModelRef(key=name, path=path, family=family)  # a folder on the workers, not here
        elif HUB_ID.match(source):
            ref = ModelRef(key=name, hub_id=source, family=family)
        else:
            raise BadArgument(
                f"{source!r} is neither a diffusers pipeline folder nor a hub id",
                field="SOURCE",
                allowed="an absolute folder path (as the workers see it) or owner/name",
            )
        self.redis.hset(keys.REGISTERED_MODELS, name, json.dumps(ref.entry()))
        return ref

    def unregister(self, name: str) -> bool:
        return bool(self.redis is not None and self.redis.hdel(keys.REGISTERED_MODELS, name))

    def _registered_ref(self, name: str) -> ModelRef | None:
        raw = (
            self.redis.hget(keys.REGISTERED_MODELS, name)
            if self.redis is not None and NAME.match(name)
            else None
        )
        return _from_entry(name, json.loads(raw)) if raw is not None else None

    def get(self, ref: str) -> ModelRef:
        """The model ``ref`` names; ModelError says what would have been accepted."""
        if NAME.match(ref) and is_pipeline_folder(self.folder / ref):
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
        known = (
            ", ".join(self.names())
            or f"none yet: put pipeline folders in {self.folder} or run lorafleet models add"
        )
        if path.exists():
            problem = f"{ref!r} is a path but not a diffusers pipeline folder (no model_index.json)"
        else:
            problem = f"unknown model {ref!r}"
        raise ModelError(
            problem,
            allowed=f"a registered model ({known}), a diffusers pipeline folder, or a hub id owner/name",
        )
