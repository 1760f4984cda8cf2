"""Turning what a producer asked for into a job a worker can run, or refusing it.

Resolution happens once, at submit, so that the record says exactly what will run:
the model's key and queue, each LoRA's file hash, the weights InvokeAI's LoRA guidance
gives LoRAs that came without one, the size and seed. Nothing is silently corrected: a
value the producer gave is kept, and advice goes to the record's warnings.

Semantics of default weights (``guidance``): an LCM-LoRA without a weight gets 0.35; any
other LoRA without a weight gets 0.45 when an LCM-LoRA is in the stack and 0.75 otherwise.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from lorafleet.common.catalog.controlnets import ControlNetCatalog
from lorafleet.common.catalog.embeddings import EmbeddingCatalog
from lorafleet.common.catalog.input_images import InputImages
from lorafleet.common.catalog.ip_adapters import IpAdapterCatalog
from lorafleet.common.catalog.lora_files import LoraInfo
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import HUB_ID, ModelRef, ModelRegistry
from lorafleet.common.catalog.shared_files import SharedFiles
from lorafleet.common.catalog.upscalers import UpscalerCatalog
from lorafleet.common.schema import guidance
from lorafleet.common.schema.errors import EmbeddingError, JobRejected, LoraError, ModelError, VaeError
from lorafleet.common.schema.jobs import (
    MAX_EMBEDDINGS,
    MAX_LORAS,
    MAX_SEED,
    SIDE_PATH_RANK_BUDGET,
    GenerationJob,
    LoraMode,
    LoraSpec,
    describe_validation_error,
)
from lorafleet.common.schema.prompts import PromptSyntax, check_weights, other_tags, split_lora_tags
from lorafleet.producer.family_rules import apply_family_rules
from lorafleet.producer.input_checks import InputChecks

FALLBACK_SIZE = 512
"""Width and height when neither the job nor the model's config gives one (hub ids)."""


@dataclass
class ResolvedJob:
    job: GenerationJob
    model: ModelRef
    warnings: list[str]


def new_id() -> str:
    return uuid.uuid4().hex


class JobResolver:
    """Resolves models and LoRAs against the registry and the LoRA drop folder."""

    def __init__(
        self,
        models: ModelRegistry,
        loras: LoraCatalog,
        lcm_loras: dict[str, str] | None = None,
        *,
        allow_paths: bool = True,
        allow_hub_ids: bool = True,
        lora_mode: LoraMode = LoraMode.merge,
        images: Callable[[], InputImages] | None = None,
        controlnets: ControlNetCatalog | None = None,
        ip_adapters: IpAdapterCatalog | None = None,
        url_hosts: set[str] | None = None,
        upscalers: UpscalerCatalog | None = None,
    ) -> None:
        self.models = models
        self.inputs = InputChecks(images, controlnets, ip_adapters, url_hosts, upscalers)
        self.allow_paths = allow_paths
        self.allow_hub_ids = allow_hub_ids
        self.loras = loras
        self.vaes = models.vaes
        shared = SharedFiles(models.redis, "embedding") if models.redis is not None else None
        self.embeddings = EmbeddingCatalog(models.embeddings_folder, shared)
        self.lcm_loras = dict(lcm_loras or {})
        self.lora_mode = lora_mode

    def _is_lcm(self, info: LoraInfo) -> bool:
        return info.is_lcm or info.name in self.lcm_loras.values()

    def resolve(self, job: GenerationJob, *, where: str = "") -> ResolvedJob:
        # the caller's job stays as given: resolving writes only fields and the LoRA specs
        job = job.model_copy(
            update={
                "loras": [spec.model_copy() for spec in job.loras],
                "controlnets": [unit.model_copy() for unit in job.controlnets],  # their names resolved
            }
        )
        try:
            self._check_reference(job.model)
            model = self.models.get(job.model)
        except ModelError as exc:
            raise JobRejected.of(exc, f"{where}model") from None
        warnings = list(job.advice())
        origins = self._take_prompt_loras(job, where, warnings)
        apply_family_rules(job, model, where, warnings)
        infos = [self._lora(spec, origin, model, where=where) for spec, origin in zip(job.loras, origins)]
        infos = self._merge_repeats(job, infos, origins)
        if job.lcm and not any(self._is_lcm(info) for info in infos):
            lcm = self._lcm_lora_for(model, where, warnings)
            if len(job.loras) >= MAX_LORAS:
                raise JobRejected(
                    f"lcm adds the LCM-LoRA {lcm.name!r}, which makes {MAX_LORAS + 1} LoRAs",
                    field=f"{where}loras",
                    allowed=f"at most {MAX_LORAS} LoRAs",
                )
            job.loras.append(LoraSpec(name=lcm.name, weight=guidance.LCM_LORA_WEIGHT))
            infos.append(lcm)
        has_lcm = any(self._is_lcm(info) for info in infos)
        for spec, info in zip(job.loras, infos):
            spec.name = info.name
            spec.sha256 = info.sha256
            if spec.weight is None:
                spec.weight = self._default_weight(info, has_lcm)
            if spec.inject_trigger:
                if info.trigger_words:
                    job.prompt = ", ".join(filter(None, [job.prompt, *info.trigger_words]))
                else:
                    warnings.append(f"LoRA {info.name!r} has no trigger words to inject")
        if has_lcm and not job.sampler.is_lcm:
            warnings.append(
                f"an LCM-LoRA is in the stack but the sampler is {job.sampler.value}: "
                "LCM-LoRAs are meant for the lcm sampler"
            )
        job.lora_mode = self._lora_mode(job, model, infos, where, warnings)
        job.embeddings = self._embeddings(job, model, where)
        self.inputs.check(job, model, where, warnings)
        job.vae = job.vae or model.vae
        if job.vae is not None:
            try:
                job.vae = self.vaes.get(job.vae).name
            except VaeError as exc:
                raise JobRejected.of(exc, f"{where}vae") from None
        size = model.native_size or FALLBACK_SIZE
        job.width = job.width or size
        job.height = job.height or size
        self.inputs.check_hires(job, model, where)
        if job.seed is None:
            job.seed = secrets.randbelow(MAX_SEED + 1)
        job.job_id = job.job_id or new_id()
        job.model = model.key
        return ResolvedJob(job=_checked(job, where), model=model, warnings=warnings)

    def _lora_mode(
        self, job: GenerationJob, model: ModelRef, infos: list[LoraInfo], where: str, warnings: list[str]
    ) -> LoraMode:
        """The job's own mode, else the fleet's; side only for stacks that have side paths
        (a job that asks for side with one that has none is refused naming the file). A GGUF
        model's weights are never written: side always, and a stack without side paths refused."""
        if model.quantized:
            if job.lora_mode is LoraMode.merge:
                raise JobRejected(
                    f"model {model.key!r} is a GGUF-quantized transformer: merging a LoRA would requantize "
                    "its weights (lossy, and it could not be restored)",
                    field=f"{where}lora_mode",
                    allowed="side (LoRAs run beside the quantized weights)",
                )
            reason = side_path_refusal(infos)
            if reason is not None:
                raise JobRejected(
                    f"{reason}, and model {model.key!r} is GGUF-quantized: its LoRAs run beside the weights only",
                    field=f"{where}loras",
                    allowed="LoRA or LoCon files (low-rank), within the side paths' rank budget",
                )
            return LoraMode.side
        wanted = job.lora_mode or self.lora_mode
        if wanted is LoraMode.merge:
            return wanted
        reason = side_path_refusal(infos)
        if reason is None:
            return wanted
        if job.lora_mode is LoraMode.side:
            raise JobRejected(reason, field=f"{where}lora_mode", allowed="merge for this stack")
        warnings.append(f"{reason}: the job runs merged")
        return LoraMode.merge

    def _check_reference(self, ref: str) -> None:
        """ModelError unless ``ref`` is a local or registered name, or a path or hub id the
        operator allows (LORAFLEET_ALLOW_MODEL_PATHS, LORAFLEET_ALLOW_HUB_IDS). Checked before
        anything touches the filesystem, and refused in the same words either way, so a
        submitter learns nothing about the host's files."""
        if self.models.is_local_name(ref):
            return
        if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
            if not self.allow_hub_ids:
                error = self.models.unknown(ref)
                raise ModelError(
                    error.reason,
                    allowed=f"{error.allowed}; hub ids only once registered (lorafleet models add NAME "
                    f"{ref}) or with LORAFLEET_ALLOW_HUB_IDS=true",
                )
            return
        if not self.allow_paths:
            raise self.models.unknown(ref)

    def _take_prompt_loras(self, job: GenerationJob, where: str, warnings: list[str]) -> list[str]:
        """Move the prompt's LoRA tags to the end of ``job.loras``, in the order written, and
        return where each stack entry came from (a field, or the tag), for messages."""
        a1111 = job.prompt_syntax is PromptSyntax.a1111
        for text, field in ((job.prompt, "prompt"), (job.negative_prompt, "negative_prompt")):
            for tag in other_tags(text):
                warnings.append(
                    f"{where}{field}: {tag} is not a LoRA tag; taken out of the text unused, as A1111 does"
                )
        try:
            job.prompt, tags = split_lora_tags(job.prompt)
            if a1111:
                check_weights(job.prompt)
        except ValueError as exc:
            raise JobRejected(str(exc), field=f"{where}prompt") from None
        try:
            negative, negative_tags = split_lora_tags(job.negative_prompt)
            if a1111:
                check_weights(negative)
        except ValueError as exc:
            raise JobRejected(str(exc), field=f"{where}negative_prompt") from None
        if negative_tags:
            raise JobRejected(
                f"{negative_tags[0].text} is a LoRA tag in the negative prompt",
                field=f"{where}negative_prompt",
                allowed="LoRA tags in the prompt (a LoRA changes the whole model, not one prompt)",
            )
        job.negative_prompt = negative
        origins = [f"{where}loras[{index}]" for index in range(len(job.loras))]
        for tag in tags:
            try:
                spec = LoraSpec(name=tag.name, weight=tag.weight, text_encoder_weight=tag.text_encoder_weight)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{field}: {message}" for field, message in describe_validation_error(exc)
                )
                raise JobRejected(f"LoRA tag {tag.text}: {problems}", field=f"{where}prompt") from None
            job.loras.append(spec)
            origins.append(f"{where}prompt tag {tag.text}")
        if len(job.loras) > MAX_LORAS:
            raise JobRejected(
                f"the stack has {len(job.loras)} LoRAs ({len(tags)} from tags in the prompt)",
                field=f"{where}loras",
                allowed=f"at most {MAX_LORAS} LoRAs",
            )
        return origins

    @staticmethod
    def _merge_repeats(job: GenerationJob, infos: list[LoraInfo], origins: list[str]) -> list[LoraInfo]:
        """One entry per LoRA where a prompt tag names a LoRA already in the stack at the same
        weights, or where one of the two gives no weight (the other's weights stand);
        refused where both give weights and they differ."""
        first: dict[str, int] = {}
        kept: list[int] = []
        for index, (spec, info) in enumerate(zip(job.loras, infos)):
            earlier = first.get(info.sha256)
            if earlier is None or "tag" not in origins[index] + origins[earlier]:
                first.setdefault(info.sha256, index)
                kept.append(index)
                continue
            before = job.loras[earlier]
            if before.weight is None:  # the entry without weights takes the other's
                before.weight, before.text_encoder_weight = spec.weight, spec.text_encoder_weight
            elif spec.weight is not None and (spec.weight, spec.text_encoder_weight) != (
                before.weight,
                before.text_encoder_weight,
            ):
                raise JobRejected(
                    f"LoRA {info.name!r} is in the stack twice with different weights: "
                    f"{origins[earlier]} ({_weights(before)}) and {origins[index]} ({_weights(spec)})",
                    field=origins[index].split(" ")[0],
                    allowed="each LoRA once, or the same weights in both places",
                )
        job.loras = [job.loras[index] for index in kept]
        return [infos[index] for index in kept]

    def _embeddings(self, job: GenerationJob, model: ModelRef, where: str) -> list[str]:
        """The embeddings the job names or its prompts use, each checked against the model."""
        names = sorted(set(job.embeddings) | set(self.embeddings.mentioned(job.prompt, job.negative_prompt)))
        if names and model.family is not None and model.family.is_flow:
            raise JobRejected(
                f"model {model.key!r} is {model.family.traits.label}, whose text encoder reads no "
                f"textual-inversion embeddings (the prompts use {', '.join(names)})",
                field=f"{where}embeddings",
                allowed="embeddings only on SD 1.5, SD 2.x and SDXL models",
            )
        if len(names) > MAX_EMBEDDINGS:
            raise JobRejected(
                f"the prompts use {len(names)} embeddings",
                field=f"{where}embeddings",
                allowed=f"at most {MAX_EMBEDDINGS}",
            )
        for name in names:
            try:
                info = self.embeddings.get(name)
            except EmbeddingError as exc:
                raise JobRejected.of(exc, f"{where}embeddings") from None
            problem = info.fits(model.family, model.text_widths) if model.text_widths else None
            if problem:
                raise JobRejected(
                    problem, field=f"{where}embeddings", allowed="an embedding made for this model's family"
                )
        return names

    def _default_weight(self, info: LoraInfo, has_lcm: bool) -> float:
        if self._is_lcm(info):
            return guidance.LCM_LORA_WEIGHT
        return guidance.LORA_WEIGHT_BESIDE_LCM if has_lcm else guidance.LORA_WEIGHT

    def _lora(self, spec: LoraSpec, origin: str, model: ModelRef, *, where: str) -> LoraInfo:
        from_tag = not origin.startswith(f"{where}loras[")
        field = origin.split(" ")[0] if from_tag else f"{origin}.name"
        try:
            info = self.loras.get(spec.name)
        except LoraError as exc:
            reason = f"{origin.split(' ', 1)[1]}: {exc.reason}" if from_tag else exc.reason
            raise JobRejected(reason, field=field, allowed=exc.allowed) from None
        if spec.sha256 and spec.sha256 != info.sha256:
            raise JobRejected(
                f"LoRA {spec.name!r} on disk has sha256 {info.short_hash}..., not the "
                f"{spec.sha256[:12]}... the job asks for",
                field=f"{origin}.sha256",
            )
        if info.family and model.family and info.family != model.family:
            raise JobRejected(
                f"LoRA {info.name!r} is for {info.family.value} but model {model.key!r} is {model.family.value}",
                field=field,
                allowed=f"a {model.family.value} LoRA",
            )
        made, serving = info.transformer_width, model.transformer_width
        if made and serving and made != serving:
            variant = f" ({info.variant})" if info.variant else ""
            raise JobRejected(
                f"LoRA {info.name!r} was made for a {info.family.traits.label if info.family else ''} transformer "
                f"{made} wide{variant} but model {model.key!r} is {serving} wide: LoRAs do not cross variants",
                field=field,
                allowed=f"a LoRA trained on a {serving}-wide base",
            )
        width, expected = info.cross_attention_width, model.cross_attention_dim
        if width and expected and width != expected:
            raise JobRejected(
                f"LoRA {info.name!r} was made for a text embedding {width} wide but model "
                f"{model.key!r} uses {expected}",
                field=field,
                allowed=f"a LoRA trained on a {model.family.value if model.family else 'matching'} base",
            )
        return info

    def _lcm_lora_for(self, model: ModelRef, where: str, warnings: list[str]) -> LoraInfo:
        """The family's registered LCM-LoRA (LORAFLEET_LCM_LORAS), else the one named so."""
        field = f"{where}lcm"
        family = model.family.value if model.family else None
        registered = self.lcm_loras.get(family or "")
        if registered:
            try:
                return self.loras.get(registered)
            except LoraError as exc:
                raise JobRejected.of(exc, field) from None
        candidates, broken = self.loras.lcm_loras(model.family)
        for bad in broken:
            warnings.append(f"LoRA file {bad.path.name} in {self.loras.folder} is skipped: {bad.problem}")
        if not candidates:
            raise JobRejected(
                f"lcm asks for an LCM-LoRA but none for {family or 'this model'} is in {self.loras.folder}",
                field=field,
                allowed="copy the family's LCM-LoRA .safetensors there (its name containing 'lcm'), "
                'or name it in LORAFLEET_LCM_LORAS, e.g. {"sd15": "lcm-lora-sdv1-5"}',
            )
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            warnings.append(
                f"several LCM-LoRAs fit {family} ({names}); using {candidates[0].name!r} — "
                "name one in LORAFLEET_LCM_LORAS to choose"
            )
        return candidates[0]


def _weights(spec: LoraSpec) -> str:
    if spec.weight is None:
        return "default weight"
    if spec.text_encoder_weight is None:
        return f"weight {spec.weight:g}"
    return f"weight {spec.weight:g}, text encoder {spec.text_encoder_weight:g}"


def _checked(job: GenerationJob, where: str) -> GenerationJob:
    """The resolved job validated again: what resolution added (trigger words, the LCM-LoRA,
    defaults) must keep it within the schema, or the job is refused naming the field."""
    try:
        return GenerationJob.model_validate(job.model_dump())
    except ValidationError as exc:
        problems = []
        for field, message in describe_validation_error(exc):
            if field == "prompt" and any(spec.inject_trigger for spec in job.loras):
                message += " once the LoRAs' trigger words are added"
            problems.append((f"{where}{field}", message))
        raise JobRejected(
            "; ".join(f"{field}: {message}" for field, message in problems),
            field=problems[0][0],
            problems=problems,
        ) from None


NO_SIDE_PATH = ("lycoris-loha", "lycoris-lokr", "full-diff", "unknown")


def side_path_refusal(infos: list[LoraInfo]) -> str | None:
    """Why a stack cannot run on side paths (None: it can): a LoHa, LoKr, full-difference or
    DoRA file needs a dense change of the weight on every call; a stack past the rank budget
    would not fit the rows every mixed call pads to."""
    for info in infos:
        if info.format in NO_SIDE_PATH or info.format.endswith("+dora"):
            return f"LoRA {info.name!r} is a {info.format} file, which has no side path"
    ranks = sum(info.rank or 0 for info in infos)
    if ranks > SIDE_PATH_RANK_BUDGET:
        return f"the stack joins {ranks} ranks, over the side paths' budget of {SIDE_PATH_RANK_BUDGET}"
    return None
