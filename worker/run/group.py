"""Group sampling, the half of JobRunner that samples: a group of jobs that share a batch
key gets one pipeline and sampling calls of the batch size's rows, halved when the device
runs out of memory; each job is handed to the store stage as soon as its last image is
sampled, after the weights are restored if its call was the group's last. In merge mode
the group has one LoRA stack, patched, then restored from the pristine copies; on side
paths (``lora_mode`` side) every job has its own, each prompt is encoded through its own
stack's text-encoder deltas (merged for that encode) and each call's rows carry their
jobs' stacks beside the weights (worker/lora/side_paths.py). Progress and cancellation are
per job: a cancelled job leaves its call, its companions go on.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Callable
from contextlib import nullcontext

import redis
import torch

from lorafleet.common.schema.errors import JobCancelled, JobFailed, Superseded
from lorafleet.common.schema.hires import is_model_upscaler, output_size, sampled_steps
from lorafleet.common.schema.jobs import JobStatus, LoraMode
from lorafleet.worker.embeddings import applied
from lorafleet.worker.ip_adapters import ip_adapter_loaded
from lorafleet.worker.lora.module_index import TEXT_ENCODERS
from lorafleet.worker.lora.patcher import PatchTimings, StackEntry
from lorafleet.worker.lora.side_paths import NoSidePath, SidePaths, check_stack, side_stack
from lorafleet.worker.lora.store import LoadedStack
from lorafleet.worker.pipelines import HotPipeline
from lorafleet.worker.run import flow
from lorafleet.worker.run.batching import Member, Slot, chunks, stack_key
from lorafleet.worker.run.inputs import job_inputs
from lorafleet.worker.run.sampling import conditioning, image_seed, one_image_per_call, sample
from lorafleet.worker.run.store_stage import StoreContext

logger = logging.getLogger(__name__)

PREFETCH_LOOKAHEAD = 16
"""Waiting messages of the queue looked at for LoRAs to make ready while a job samples."""
PREFETCH_STACKS = 2
"""Distinct LoRA stacks of waiting jobs made ready ahead, at most, per sampling group."""


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


def allocator_message(exc: BaseException) -> str:
    """The useful part of an allocator's complaint (torch's CPU one wraps it in noise)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if match := re.search(r"tried to allocate (\d+) bytes", text):
        return f"could not allocate {int(match.group(1)) / 2**20:.0f} MiB more"
    return text


def _no_side_path_advice(hot: HotPipeline) -> str:
    if hot.model.quantized:
        return "a GGUF model takes only LoRAs that run beside its weights (LoRA or LoCon files)"
    return "submit the job with lora_mode merge"


class GroupSampling:
    """Mixed into JobRunner (worker/run/runner.py): its sampling half. Uses the runner's
    pipelines, LoRA store, caches, batch sizes, stats and record moves."""

    def _sample_group(self, members: list[Member], hot: HotPipeline, when_done: Callable) -> None:
        """Stack, patch, sample in chunks (halved on out of memory), restore; each member is
        handed to ``when_done`` as soon as its last image is sampled."""
        job = members[0].job
        assert job.width is not None and job.height is not None and job.steps is not None
        side = job.lora_mode is LoraMode.side  # every member its own stack, beside the weights
        stacks = self._stacks(hot, members)
        if side:
            members = self._side_ready(hot, members, stacks)
            if not members:
                return
        patch = PatchTimings() if side else hot.patcher.apply(stacks[members[0]].entries)
        self._prefetch(hot, members)
        for member in members:
            stack, t = stacks[member], member.timings
            t.lora_load, t.lora_hits, t.lora_misses = stack.seconds, stack.hits, stack.misses
            t.lora_apply = patch.apply
            member.warnings.extend(stack.warnings)
        tick = time.perf_counter()
        vae = self._local(self.models.vaes.get(job.vae)) if job.vae else None
        embeddings = [self._local(self.embeddings.get(name)) for name in job.embeddings]
        ip = job.ip_adapter
        ip_info = self.ip_adapter_catalog.get(ip.model) if ip is not None else None
        controls = [self._local(self.controlnet_catalog.get(spec.model)) for spec in job.controlnets]
        controlnet = self.controlnet_models.for_job(controls, hot.pipe, hot.model.key)
        upscaler = None
        if job.hr_scale and is_model_upscaler(job.hr_upscaler):  # an ESRGAN-family model
            upscaler = self.upscaler_models.get(self._local(self.upscaler_catalog.get(job.hr_upscaler)))
        contexts = {
            m: StoreContext(
                stacks[m].infos, hot.model_hash, vae, embeddings, hot.modules, tuple(controls), ip_info
            )
            for m in members
        }
        rows = self.batch_sizes.rows(job)
        with (
            self.vaes.swapped(hot, vae),
            applied(hot, embeddings),
            ip_adapter_loaded(hot.pipe, ip_info, ip.weight if ip else 1.0),
        ):
            for member in members:
                if side:  # its prompts through its own stack's text-encoder deltas, merged
                    hot.patcher.apply(
                        [StackEntry(e.lora, 0.0, e.text_encoder_strength) for e in stacks[member].entries]
                    )
                member.conditioning = conditioning(hot.pipe, member.job)
                try:
                    member.inputs = job_inputs(member.job, self.inputs)
                except (JobFailed, OSError, ValueError) as exc:  # its image gone or damaged: it alone fails
                    member.cancelled = True
                    member.ended = self._fail(
                        member.job_id,
                        f"an input image cannot be read: {exc}",
                        member.timings,
                        member.warnings,
                    )
                if flow.is_flow(hot.pipe):
                    member.warnings.extend(flow.prompt_warnings(hot.pipe, member.job))
                    self._recount(member, sampled_steps(member.job, flow=True))
            if side:
                hot.patcher.restore()
            one_per_call = one_image_per_call(job)
            plan = chunks(members, rows, one_per_call)
            restored, handed = None, set()
            while plan:
                chunk = [slot for slot in plan.pop(0) if not slot.member.cancelled]
                if not chunk:
                    continue
                try:
                    self._sample_chunk(hot, job, chunk, rows, stacks if side else None, controlnet, upscaler)
                except Exception as exc:
                    if not is_out_of_memory(exc) or rows == 1:
                        raise
                    if job.batch_size is None:  # the worker's size: remembered for the next ones
                        smaller = self.batch_sizes.halve(job.model, *output_size(job), rows)
                    else:
                        smaller = rows // 2
                    logger.warning(
                        "out of memory at %d images per call; trying %d (kept for %s at %dx%d)",
                        rows,
                        smaller,
                        hot.model.key,
                        job.width,
                        job.height,
                    )
                    if job.batch_size is not None:
                        for member in [m for m in members if m not in handed]:
                            member.warnings.append(
                                f"batch_size {job.batch_size} ran out of memory on this worker: sampled "
                                f"{smaller} images per call, so the pixels may differ in their last bits"
                            )
                    rows = smaller
                    free_memory(self.pipelines.device)
                    plan = chunks(members, rows, one_per_call)
                    continue
                done = [
                    m for m in dict.fromkeys(slot.member for slot in chunk) if m.complete and not m.cancelled
                ]
                for member in done:
                    member.timings.sampling = time.perf_counter() - tick
                try:
                    last = not any(not slot.member.cancelled for left in plan for slot in left)
                    if last:  # the last call: its jobs end with the weights restored
                        restored = self._restore_group(hot, patch, [m for m in members if m not in handed])
                finally:
                    for member in done:
                        handed.add(member)
                        when_done(member, contexts[member])
        if restored is None:  # the last calls were all cancelled
            self._restore_group(hot, patch, [])

    def _restore_group(self, hot: HotPipeline, patch, members: list[Member]):
        """Put the weights back to W₀ after a group's last call. Its time goes into the
        timings of ``members``, the jobs not yet handed to the store stage; a job of an earlier
        call ended before it (its ``restore`` stays None)."""
        restored = hot.patcher.restore()
        seconds = patch.restore + restored.restore
        self.stats.switch_seconds.append(patch.apply + seconds)
        for member in members:
            member.timings.restore = seconds
        return restored

    def _prefetch(self, hot: HotPipeline, members: list[Member]) -> None:
        """Make the LoRAs of the next waiting jobs of this queue ready while these sample."""
        if self._prefetch_stage is None:
            return
        own = stack_key(members[0].job)
        try:
            ids = [w.job_id for w in self.waiting.peek(members[0].record.queue, PREFETCH_LOOKAHEAD)]
            records = self.store.get_many(ids)
        except redis.RedisError:
            return
        stacks: dict[tuple, list] = {}
        for record in records:
            if record is None or record.status is not JobStatus.queued or not record.job.loras:
                continue
            key = stack_key(record.job)
            if key != own and len(stacks) < PREFETCH_STACKS:
                stacks.setdefault(key, record.job.loras)
        for specs in stacks.values():
            self._prefetch_stage.submit(self._prepare, hot, specs)

    def _prepare(self, hot: HotPipeline, specs: list) -> None:
        try:
            self.loras.prepare(hot.model.key, hot.patcher, specs)
        except Exception as exc:  # the job itself meets it again and fails saying why
            logger.info("LoRAs of a waiting job not made ready ahead: %s", exc)

    def _side_ready(self, hot: HotPipeline, members: list[Member], stacks: dict) -> list[Member]:
        """The members whose stacks can take a row of a call on side paths; each of the others
        ends failed on its own, saying why (its companions go on)."""
        denoiser = {n: m for n, m in hot.patcher.components.items() if n not in TEXT_ENCODERS}
        ready = []
        for member in members:
            try:
                check_stack(side_stack(stacks[member].entries), denoiser)
            except NoSidePath as exc:
                member.cancelled = True  # it leaves the group: ended here, not by the store stage
                member.ended = self._fail(
                    member.job_id,
                    f"{exc}: {_no_side_path_advice(hot)}",
                    member.timings,
                    member.warnings,
                )
            else:
                ready.append(member)
        return ready

    def _stacks(self, hot: HotPipeline, members: list[Member]) -> dict[Member, LoadedStack]:
        """Each member's LoRA stack, loaded once per distinct stack."""
        loaded: dict[tuple, LoadedStack] = {}
        for member in members:
            key = stack_key(member.job)
            if key not in loaded:
                loaded[key] = self.loras.stack(hot.model.key, hot.patcher, member.job.loras)
                self.stats.lora_hits += loaded[key].hits
                self.stats.lora_misses += loaded[key].misses
        return {member: loaded[stack_key(member.job)] for member in members}

    def _side_paths(self, hot: HotPipeline, chunk: list[Slot], rows: int, stacks: dict) -> SidePaths:
        """The call's side paths: each image's row its job's stack, the rows that fill the
        call none; its build time goes into the jobs' ``lora_apply``."""
        start = time.perf_counter()
        denoiser = {n: m for n, m in hot.patcher.components.items() if n not in TEXT_ENCODERS}
        rows_stacks = [side_stack(stacks[slot.member].entries) for slot in chunk]
        try:
            paths = SidePaths.build(denoiser, rows_stacks + [[]] * (rows - len(chunk)))
        except NoSidePath as exc:
            raise JobFailed(f"{exc}; {_no_side_path_advice(hot)}") from None
        for member in dict.fromkeys(slot.member for slot in chunk):
            member.timings.lora_apply = (member.timings.lora_apply or 0.0) + time.perf_counter() - start
        return paths

    def _sample_chunk(
        self,
        hot: HotPipeline,
        job,
        chunk: list[Slot],
        rows: int,
        stacks: dict | None,
        controlnet=None,
        upscaler=None,
    ) -> None:
        """One pipeline call for the chunk's images; progress and cancellation per job (on
        side paths when ``stacks`` gives each member's stack)."""
        counts: dict[Member, int] = {}
        for slot in chunk:
            counts[slot.member] = counts.get(slot.member, 0) + 1
        steps = sampled_steps(job, flow=flow.is_flow(hot.pipe))

        def on_step(step: int) -> None:
            live = 0
            for member, count in counts.items():
                if member.cancelled:
                    continue
                try:
                    done = member.sampled * steps + step * count
                    self._progress(member.job_id, done, last=step == steps)
                    live += 1
                except JobCancelled:
                    self._cancelled(member)
                except Superseded as exc:
                    logger.warning("%s; this run stops without writing it", exc)
                    member.cancelled = True
            if not live:
                raise JobCancelled("every job of the call was cancelled")

        paths = self._side_paths(hot, chunk, rows, stacks) if stacks is not None else None
        try:
            with paths.attached() if paths is not None else nullcontext():
                images = sample(
                    hot.pipe,
                    hot.scheduler_config,
                    job,
                    [slot.member.conditioning for slot in chunk],
                    [image_seed(slot.member.job, slot.index) for slot in chunk],
                    on_step,
                    rows,
                    inputs=[slot.member.inputs for slot in chunk],
                    controlnet=controlnet,
                    upscaler=upscaler,
                )
        except JobCancelled:
            return
        for slot, image in zip(chunk, images):
            slot.member.images[slot.index] = image
            slot.member.rows[slot.index] = rows

    def _recount(self, member: Member, steps: int) -> None:
        """The record's progress total as this pipeline counts its steps (``steps`` per image):
        the start counted them SD's way, the record not knowing the model's family, and a flow
        family's image-to-image runs one more where steps x strength is not whole. Written
        with the job's next progress (runner ``_progress``)."""
        total = steps * member.job.num_images
        if member.record.progress.total == total:
            return
        member.record.progress.total = total
        self._totals[member.job_id] = total
        if self.stats.current_job == member.job_id:
            self.stats.current_total = total

    def _cancelled(self, member: Member) -> None:
        """A job cancelled while it samples leaves its call; its companions go on."""
        member.cancelled = True
        self.stats.cancelled += 1
        self.finish(
            member.job_id,
            JobStatus.cancelled,
            error="cancelled while running",
            timings=member.timings,
            warnings=member.warnings,
        )
        logger.info("job %s cancelled while running", member.job_id)
