"""Base models by name: a diffusers folder, a single-file checkpoint, or a hub id.

A model in ``<home>/models/<name>`` is a diffusers pipeline folder; a .safetensors
checkpoint in ``<home>/autoimport/main/`` is a model by its file name (as in InvokeAI's
autoimport); `lorafleet models add` registers either for every machine. Every model has a key
that names it on the queue (``keys.queue(key)``): the name, the absolute path of a folder
given directly, or the hub id. Producers and workers resolve the same way, so a worker
started with ``--models NAME`` consumes exactly the jobs submitted for NAME.

Reading a model's family and native size needs only its JSON configs, never torch; a
config that is not valid JSON is a ModelError naming the file, not a model of unknown family.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from lorafleet.common.catalog.checkpoints import CANONICAL_CONFIGS, NATIVE_SIZE, describe_checkpoint
from lorafleet.common.catalog.flow_models import check_base, flow_native_size, transformer_width
from lorafleet.common.catalog.gguf_files import GGUF_SUFFIX
from lorafleet.common.catalog.lora_files import PICKLED_SUFFIXES, SAFETENSORS_SUFFIX
from lorafleet.common.catalog.shared_files import SharedFiles
from lorafleet.common.catalog.vaes import VaeCatalog
from lorafleet.common.schema import keys
from lorafleet.common.schema.errors import BadArgument, ConfigError, FileRefused, ModelError, VaeError
from lorafleet.common.schema.family import Family, pipeline_family
from lorafleet.common.schema.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_ALLOWED = "letters, digits, '.', '_' and '-', starting with a letter or digit"
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX, GGUF_SUFFIX)
"""Single-file models: safetensors checkpoints, and GGUF transformers of the flow families."""


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
    config: str | None = None
    """A single-file checkpoint's component configs: a diffusers folder or a hub id."""
    vae: str | None = None
    """The VAE its jobs decode with when they name none (a name in autoimport/vae)."""
    text_widths: dict[str, int] | None = None
    """Width of each text encoder's token vectors (``text_encoder``, ``text_encoder_2``)."""
    guidance_embeds: bool | None = None
    """Whether the denoiser reads a distilled guidance value (FLUX.1 dev and Krea; not schnell)."""
    transformer_width: int | None = None
    """A flow family's transformer width (FLUX.2 Klein 4B: 3072, 9B: 4096): LoRAs do not cross it."""
    distilled: bool | None = None
    """Step-distilled (FLUX.1 schnell; FLUX.2 Klein's ``is_distilled``): few steps, no CFG by default."""
    inpainting: bool | None = None
    """An inpainting model (its UNet reads 9 channels): its jobs need an init image and a mask."""

    @property
    def queue(self) -> str:
        return keys.queue(self.key)

    @property
    def source(self) -> str:
        """What is loaded: the folder or checkpoint file, or the hub id."""
        return str(self.path) if self.path else str(self.hub_id)

    @property
    def single_file(self) -> bool:
        """Whether the model is one checkpoint file (loaded with diffusers' single-file support)."""
        return self.path is not None and self.path.suffix.lower() in CHECKPOINT_SUFFIXES

    @property
    def quantized(self) -> bool:
        """A GGUF checkpoint: its weights are quantized blocks, never written (LoRAs run beside them)."""
        return self.path is not None and self.path.suffix.lower() == GGUF_SUFFIX

    def entry(self) -> dict:
        """What the registry keeps in Redis for this model."""
        return {
            "source": self.source,
            "family": self.family.value if self.family else None,
            "native_size": self.native_size,
            "cross_attention_dim": self.cross_attention_dim,
            "prediction_type": self.prediction_type,
            "config": self.config,
            "vae": self.vae,
            "text_widths": self.text_widths,
            "guidance_embeds": self.guidance_embeds,
            "transformer_width": self.transformer_width,
            "distilled": self.distilled,
            "inpainting": self.inpainting,
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
    text_encoder = _config(folder / "text_encoder" / "config.json")
    text_encoder_2 = _config(folder / "text_encoder_2" / "config.json")
    widths = {
        name: config["hidden_size"]
        for name, config in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
        if isinstance(config.get("hidden_size"), int)
    }
    cross = unet.get("cross_attention_dim")
    cross = cross if isinstance(cross, int) else None
    native = None
    if isinstance(unet.get("sample_size"), int) and isinstance(vae.get("block_out_channels"), list):
        native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    prediction = scheduler.get("prediction_type")
    family = pipeline_family(str(index.get("_class_name", "")), cross, text_encoder.get("hidden_act"))
    guidance_embeds = width = distilled = None
    if family is not None and family.is_flow:
        transformer = _config(folder / "transformer" / "config.json")
        native = flow_native_size(vae)
        guidance_embeds = bool(transformer.get("guidance_embeds", False))
        width = transformer_width(transformer)
        distilled = bool(index.get("is_distilled")) or (family is Family.flux1 and not guidance_embeds)
    return ModelRef(
        key=key,
        path=folder,
        family=family,
        native_size=native,
        cross_attention_dim=cross,
        prediction_type=prediction if isinstance(prediction, str) else None,
        text_widths=widths or None,
        guidance_embeds=guidance_embeds,
        transformer_width=width,
        distilled=distilled,
        inpainting=unet.get("in_channels") == 9 or None,
    )


def is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def is_checkpoint_path(path: Path) -> bool:
    """A path that names a single-file checkpoint (or a pickled one, which is then refused)."""
    return path.suffix.lower() in (*CHECKPOINT_SUFFIXES, *PICKLED_SUFFIXES)


def describe_checkpoint_file(
    key: str, path: Path, config: str | None, settings_configs: dict[str, str]
) -> ModelRef:
    """A checkpoint file as a model: its family from the tensors, its configs from ``config``,
    else LORAFLEET_CHECKPOINT_CONFIGS, else the family's canonical repository."""
    try:
        info = describe_checkpoint(path)
    except FileRefused as exc:
        raise ModelError(f"{path.name}: {exc.reason}", allowed=exc.allowed) from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    kind = f"{info.family.value}-inpainting" if info.inpainting else info.family.value
    config = config or settings_configs.get(kind) or info.canonical_config
    native = NATIVE_SIZE[info.family]
    prediction = info.prediction_type
    folder = Path(config)
    if folder.is_absolute() and is_pipeline_folder(folder):
        described = describe_folder(key, folder)
        native = described.native_size or native
        prediction = prediction or described.prediction_type
    return ModelRef(
        key=key,
        path=path.absolute(),
        family=info.family,
        native_size=native,
        cross_attention_dim=info.cross_attention_dim,
        prediction_type=prediction,
        config=config,
        text_widths=info.text_widths or None,
        guidance_embeds=info.guidance_embeds,
        transformer_width=info.transformer_width,
        distilled=(info.family is Family.flux1 and info.guidance_embeds is False) or None,
        inpainting=info.inpainting or None,
    )


def _from_entry(name: str, entry: dict, configs: dict[str, str]) -> ModelRef:
    source = entry["source"]
    known = {
        "family": Family.parse(entry.get("family")),
        "native_size": entry.get("native_size"),
        "cross_attention_dim": entry.get("cross_attention_dim"),
        "prediction_type": entry.get("prediction_type"),
        "config": entry.get("config"),
        "text_widths": entry.get("text_widths"),
        "guidance_embeds": entry.get("guidance_embeds"),
        "transformer_width": entry.get("transformer_width"),
        "distilled": entry.get("distilled"),
        "inpainting": entry.get("inpainting"),
    }
    vae = entry.get("vae")
    return replace(_source_ref(name, source, known, configs), vae=vae)


def _source_ref(name: str, source: str, known: dict, configs: dict[str, str]) -> ModelRef:
    if not source.startswith("/"):
        return ModelRef(key=name, hub_id=source, **known)
    path = Path(source)
    if is_pipeline_folder(path):  # this machine sees the folder: read what it says
        described = describe_folder(name, path)
        return replace(described, family=described.family or known["family"])
    if path.is_file() and is_checkpoint_path(path):  # this machine sees the checkpoint
        return describe_checkpoint_file(name, path, known["config"], configs)
    if is_checkpoint_path(path) and known["config"] is None and known["family"] is not None:
        known["config"] = configs.get(known["family"].value) or CANONICAL_CONFIGS[known["family"]]
    return ModelRef(key=name, path=path, **known)  # a file or folder only the workers see


def _dropped_name(path: Path) -> str:
    """A dropped file's model name: its stem, or its whole name beside a twin (``flux.gguf``)."""
    twins = [path.with_suffix(s) for s in CHECKPOINT_SUFFIXES if s != path.suffix.lower()]
    return path.name if any(t.is_file() for t in twins) else path.stem


class ModelRegistry:
    """Resolves what a job's ``model`` field names.

    A name is looked up in the home's ``models/`` folder first, then (given a Redis client)
    among the models registered with `lorafleet models add`, which every producer and worker
    on the broker shares.
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.folder = settings.models_dir
        self.checkpoints = settings.checkpoints_dir
        self.configs = dict(settings.checkpoint_configs)
        self.vaes = VaeCatalog(settings.vae_dir, SharedFiles(client, "vae") if client is not None else None)
        self.embeddings_folder = settings.embedding_dir
        self.redis = client
        self._batch = threading.local()

    @contextmanager
    def looked_up_once(self) -> Iterator[None]:
        """Within the block, ``get`` describes each model once (this thread): a batch of jobs
        for one model costs one look at its folder or registry entry, not one per job."""
        self._batch.found = {}
        try:
            yield
        finally:
            self._batch.found = None

    def local_names(self) -> list[str]:
        """Pipeline folders under models/ and checkpoint files under autoimport/main/."""
        folders = (
            [p.name for p in self.folder.iterdir() if is_pipeline_folder(p)] if self.folder.is_dir() else []
        )
        files = (
            [p for suffix in CHECKPOINT_SUFFIXES for p in self.checkpoints.glob(f"*{suffix}") if p.is_file()]
            if self.checkpoints.is_dir()
            else []
        )
        return sorted(set(folders) | {_dropped_name(p) for p in files})

    def _checkpoint_in_folder(self, name: str) -> Path | None:
        if not NAME.match(name):
            return None
        for suffix in CHECKPOINT_SUFFIXES:  # a name with its suffix names that file only
            if name.lower().endswith(suffix):
                path = self.checkpoints / f"{name[: -len(suffix)]}{suffix}"
                return path if path.is_file() else None
        found = [p for p in (self.checkpoints / f"{name}{s}" for s in CHECKPOINT_SUFFIXES) if p.is_file()]
        if len(found) > 1:
            raise ModelError(
                f"{name!r} names {' and '.join(p.name for p in found)} in {self.checkpoints}",
                allowed="the file's name with its suffix",
            )
        return found[0] if found else None

    def names(self) -> list[str]:
        return sorted(set(self.local_names()) | set(self.registered()))

    def registered(self) -> dict[str, dict]:
        if self.redis is None:
            return {}
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(keys.REGISTERED_MODELS).items()}

    def register(
        self,
        name: str,
        source: str,
        family: Family | None = None,
        config: str | None = None,
        vae: str | None = None,
        base: str | None = None,
    ) -> ModelRef:
        """Register ``name`` for every machine: a folder or checkpoint file (as the workers
        see it) or a hub id; ``config`` gives a checkpoint's component configs; ``base`` (a
        registered model, a folder or a hub id of the same family) gives a transformer-only
        checkpoint its text encoders, tokenizers and VAE (for an SD checkpoint: its configs)."""
        if self.redis is None:
            raise ConfigError(
                "registering a model needs a broker (LORAFLEET_BROKER_URL or the embedded Redis)"
            )
        if not NAME.match(name):
            raise BadArgument(f"{name!r} is not a model name", field="NAME", allowed=NAME_ALLOWED)
        path = Path(source).expanduser()
        base_ref = None
        if base is not None:
            if config is not None:
                raise BadArgument(
                    "--base and --config name the same thing", field="--base", allowed="one of them"
                )
            if not is_checkpoint_path(path):
                raise BadArgument("only a single-file checkpoint takes --base", field="--base")
            config, base_ref = self._base(base)
        if config is not None and not (HUB_ID.match(config) or Path(config).is_absolute()):
            raise BadArgument(
                f"{config!r} is neither an absolute folder path nor a hub id",
                field="--config",
                allowed="a diffusers folder as the workers see it, or owner/name",
            )
        if config is not None and not is_checkpoint_path(path):
            raise BadArgument("only a single-file checkpoint takes --config", field="--config")
        if is_pipeline_folder(path):
            described = describe_folder(name, path.absolute())
            ref = replace(described, family=family or described.family)
        elif is_checkpoint_path(path) and (path.exists() or not path.is_absolute()):
            try:
                ref = describe_checkpoint_file(name, path, config, self.configs)
            except ModelError as exc:
                raise BadArgument(exc.reason, field="SOURCE", allowed=exc.allowed) from None
            if family is not None and family is not ref.family:
                raise BadArgument(f"the file's tensors say {ref.family}, not {family}", field="--family")
            if base_ref is not None:
                check_base(base, base_ref, ref, path.name)
        elif path.is_absolute():  # a folder or file on the workers, not here: what it was given
            if is_checkpoint_path(path):
                family = family or (base_ref.family if base_ref is not None else None)
                ref = ModelRef(key=name, path=path, family=family, config=config)
            else:
                ref = ModelRef(key=name, path=path, family=family)
        elif HUB_ID.match(source):
            ref = ModelRef(key=name, hub_id=source, family=family)
        else:
            raise BadArgument(
                f"{source!r} is neither a diffusers pipeline folder nor a hub id",
                field="SOURCE",
                allowed="an absolute folder path (as the workers see it) or owner/name",
            )
        if vae is not None:
            try:
                vae = self.vaes.get(vae).name
            except VaeError as exc:
                raise BadArgument(exc.reason, field="--vae", allowed=exc.allowed) from None
        ref = replace(ref, vae=vae)
        self.redis.hset(keys.REGISTERED_MODELS, name, json.dumps(ref.entry()))
        return ref

    def _base(self, base: str) -> tuple[str, ModelRef | None]:
        """Where a checkpoint's other components come from, and that base if it is readable:
        a registered or local model's folder or hub id, else the folder or hub id given."""
        path = Path(base).expanduser()
        if NAME.match(base) and (base in self.registered() or self.is_local_name(base)):
            ref = self.get(base)
            if ref.single_file:
                raise BadArgument(
                    f"{base!r} is itself a single-file checkpoint",
                    field="--base",
                    allowed="a model that is a diffusers folder or a hub id",
                )
            return ref.source, ref if ref.path is not None and is_pipeline_folder(ref.path) else None
        if path.is_absolute() and is_pipeline_folder(path):
            return str(path), describe_folder(base, path)
        if path.is_absolute() or HUB_ID.match(base):
            return base, None  # a folder only the workers see, or a hub id: checked when loaded
        raise BadArgument(
            f"{base!r} is neither a registered model, a folder nor a hub id",
            field="--base",
            allowed="a registered model name, an absolute diffusers folder (as the workers see it), or owner/name",
        )

    def unregister(self, name: str) -> bool:
        return bool(self.redis is not None and self.redis.hdel(keys.REGISTERED_MODELS, name))

    def _registered_ref(self, name: str) -> ModelRef | None:
        raw = (
            self.redis.hget(keys.REGISTERED_MODELS, name)
            if self.redis is not None and NAME.match(name)
            else None
        )
        return _from_entry(name, json.loads(raw), self.configs) if raw is not None else None

    def _by_path(self, ref: str) -> ModelRef | None:
        """The model at path ``ref`` (a checkpoint or a pipeline folder), a hub id, or None."""
        path = Path(ref).expanduser()
        if path.is_file() and is_checkpoint_path(path):
            return describe_checkpoint_file(str(path.absolute()), path, None, self.configs)
        if is_pipeline_folder(path):
            path = path.absolute()
            if path.parent == self.folder.absolute():
                return describe_folder(path.name, path)
            return describe_folder(str(path), path)
        if HUB_ID.match(ref) and not path.exists():
            return ModelRef(key=ref, hub_id=ref)
        return None

    def is_local_name(self, ref: str) -> bool:
        """Whether ``ref`` is the name of a model here (a folder under models/, a checkpoint in
        autoimport/main/) or a registered one: nothing a submitter could use to probe paths."""
        if not NAME.match(ref):
            return False
        return (
            is_pipeline_folder(self.folder / ref)
            or self._checkpoint_in_folder(ref) is not None
            or self._registered_ref(ref) is not None
        )

    def unknown(self, ref: str) -> ModelError:
        """The refusal of a model reference that names nothing usable here; the same words
        whether or not a file of that name exists."""
        known = (
            ", ".join(self.names())
            or f"none yet: put pipeline folders in {self.folder} or run lorafleet models add"
        )
        return ModelError(f"unknown model {ref!r}", allowed=f"a registered model ({known})")

    def get(self, ref: str) -> ModelRef:
        """The model ``ref`` names; ModelError says what would have been accepted."""
        found = getattr(self._batch, "found", None)
        if found is None:
            return self._get(ref)
        if ref not in found:
            found[ref] = self._get(ref)
        return found[ref]

    def _get(self, ref: str) -> ModelRef:
        if NAME.match(ref) and is_pipeline_folder(self.folder / ref):
            return describe_folder(ref, self.folder / ref)
        dropped = self._checkpoint_in_folder(ref)
        if dropped is not None:
            return describe_checkpoint_file(_dropped_name(dropped), dropped, None, self.configs)
        registered = self._registered_ref(ref)
        if registered is not None:
            return registered
        try:
            found = self._by_path(ref)
        except (OSError, RuntimeError, ValueError):  # a name too long for a path, "~nobody", a NUL
            found = None
        if found is not None:
            return found
        path = Path(ref)
        known = (
            ", ".join(self.names())
            or f"none yet: put pipeline folders in {self.folder} or run lorafleet models add"
        )
        pickled = [self.checkpoints / f"{ref}{s}" for s in PICKLED_SUFFIXES] if NAME.match(ref) else []
        if any(p.is_file() for p in pickled):
            found = next(p for p in pickled if p.is_file())
            raise ModelError(
                f"{found.name} is a pickled {found.suffix} checkpoint: loading it can run arbitrary code",
                allowed="a .safetensors checkpoint (convert it with a trusted tool first)",
            )
        if _exists(path):
            problem = f"{ref!r} is a path but not a diffusers pipeline folder (no model_index.json)"
        else:
            problem = f"unknown model {ref!r}"
        raise ModelError(
            problem,
            allowed=f"a registered model ({known}), a diffusers pipeline folder, a .safetensors checkpoint, "
            "or a hub id owner/name",
        )
