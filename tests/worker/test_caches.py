"""Hot pipelines and parsed LoRAs are kept within their budgets, never evicting what is in use."""

from __future__ import annotations

import torch

from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.jobs import LoraSpec
from lorafleet.worker.lora.files import LoraFiles
from lorafleet.worker.lora.store import LoraStore
from lorafleet.worker.pipelines import PipelineCache, pipeline_bytes
from tests.conftest import TINY, TINY_XL


def test_pipelines_are_loaded_once_and_the_least_recently_used_goes_first(settings):
    registry = ModelRegistry(settings)
    sd15, sdxl = registry.get(TINY), registry.get(TINY_XL)
    cache = PipelineCache(settings.model_copy(update={"max_pipelines": 1}))
    first, seconds = cache.get(sd15)
    assert seconds > 0 and cache.get(sd15) == (first, 0.0)
    with cache.using(first):
        second, _ = cache.get(sdxl)  # over capacity, but the one in use stays
        assert {h.model.key for h in cache.loaded()} == {TINY, TINY_XL}
    assert [h.model.key for h in cache.loaded()] == [TINY_XL]
    assert cache.loads == 2


def test_a_byte_budget_evicts_idle_pipelines(settings):
    registry = ModelRegistry(settings)
    sd15, sdxl = registry.get(TINY), registry.get(TINY_XL)
    size = pipeline_bytes(sd15, torch.float32)
    assert size > 1_000_000
    budget_mb = (size + pipeline_bytes(sdxl, torch.float32)) // 2**20  # room for less than both
    cache = PipelineCache(settings.model_copy(update={"pipeline_memory_mb": budget_mb, "max_pipelines": 4}))
    cache.get(sd15)
    cache.get(sdxl)
    assert [h.model.key for h in cache.loaded()] == [TINY_XL]
    assert cache.used_bytes <= cache.budget_bytes


def test_parsed_loras_stay_within_their_budget_but_a_jobs_own_stack_is_kept(settings):
    registry = ModelRegistry(settings)
    pipelines = PipelineCache(settings)
    hot, _ = pipelines.get(registry.get(TINY))
    catalog = LoraCatalog(settings.lora_dir)
    store = LoraStore(
        LoraFiles(catalog, None, None), pipelines.device, budget_bytes=1
    )  # smaller than any LoRA
    specs = [LoraSpec(name="watercolor", weight=1.0), LoraSpec(name="ink-sketch", weight=1.0)]
    stack = store.stack(TINY, hot.patcher, specs)
    assert (stack.hits, stack.misses) == (0, 2) and len(stack.entries) == 2
    assert len(store.cached()) == 2  # both pinned by the job that uses them
    store.stack(TINY, hot.patcher, specs[:1])
    assert [key[1] for key in store.cached()] == [catalog.get("watercolor").sha256]
    roomy = LoraStore(LoraFiles(catalog, None, None), pipelines.device, budget_bytes=2**30)
    roomy.stack(TINY, hot.patcher, specs)
    again = roomy.stack(TINY, hot.patcher, specs)
    assert (again.hits, again.misses) == (2, 0)


def test_add_on_models_count_against_the_pipeline_budget(settings, tmp_path):
    """ControlNets and upscalers live within the hot pipelines' byte budget: the least recently
    used add-on goes first, then an idle pipeline; the pipeline a job runs on stays."""
    from lorafleet.common.catalog.controlnets import ControlNetCatalog
    from lorafleet.common.catalog.upscalers import describe_upscaler
    from lorafleet.worker.controlnets import ControlNetCache
    from lorafleet.worker.pipelines import module_bytes
    from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_upscaler
    from lorafleet.worker.upscalers import UpscalerCache

    sd15 = ModelRegistry(settings).get(TINY)
    pipeline = pipeline_bytes(sd15, torch.float32)
    make_tiny_controlnet(sd15.path, tmp_path / "controlnet" / "canny")
    control = ControlNetCatalog(tmp_path / "controlnet").get("canny")
    upscaler = describe_upscaler(make_tiny_upscaler(tmp_path / "4x.safetensors"))
    cache = PipelineCache(settings.model_copy(update={"max_pipelines": 2}))
    controlnets = ControlNetCache(cache.device, torch.float32, pipelines=cache)
    upscalers = UpscalerCache(cache.device, pipelines=cache)
    control_size = module_bytes(controlnets.get(control))
    upscaler_size = module_bytes(upscalers.get(upscaler))
    assert cache.used_bytes == control_size + upscaler_size  # no pipeline yet

    # (set in bytes: the MiB of pipeline_memory_mb are coarse for tiny models)
    # room for the pipeline and one add-on: the older add-on (the ControlNet) makes way
    cache._budget = pipeline + upscaler_size + control_size // 2
    hot, _ = cache.get(sd15)
    assert cache.used_bytes <= cache.budget_bytes and [h.model.key for h in cache.loaded()] == [TINY]
    assert upscalers._loaded.keys() == [upscaler.sha256] and controlnets._loaded.keys() == []

    # with the pipeline in use, the ControlNet displaces the upscaler, never the pipeline
    with cache.using(hot):
        controlnets.get(control)
        assert [h.model.key for h in cache.loaded()] == [TINY] and upscalers._loaded.keys() == []
    # an idle pipeline makes room when the add-ons alone would not
    cache._budget = control_size + upscaler_size + 1
    upscalers.get(upscaler)
    assert cache.loaded() == [] and cache.used_bytes <= cache.budget_bytes
