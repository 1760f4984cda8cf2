"""Transformer-only checkpoints of the flow families, in their original code's names and in
fp8, loaded on a base folder: the same pixels as the folder they were written from (fp8: as
the folder with fp8-cast weights); bad files refused naming the file; LoRAs on fp8 weights
merged the same way every time and restored bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from lorafleet.common.schema.errors import JobFailed
from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.worker.flow_checkpoints import FP8, load_flow_checkpoint, transformer_to_original
from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from lorafleet.worker.run.sampling import conditioning, sample
from lorafleet.worker.tiny import make_tiny_model

FAMILIES = {
    "flux1": "FluxPipeline",
    "zimage": "ZImagePipeline",
    "qwenimage": "QwenImagePipeline",
    "flux2": "Flux2KleinPipeline",
}
PREFIX = {
    "flux1": "model.diffusion_model.",
    "zimage": "",
    "qwenimage": "model.diffusion_model.",
    "flux2": "diffusion_model.",
}
"""How the downloads name them: ComfyUI's repackaged files, BFL's, Tongyi's."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-checkpoints")
    return {family: make_tiny_model(root / family, family=family) for family in FAMILIES}


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(pipe, **fields) -> np.ndarray:
    job = GenerationJob(
        **(
            {
                "model": "m",
                "prompt": "a lighthouse at night",
                "width": 64,
                "height": 64,
                "steps": 2,
                "seed": 5,
                "cfg_scale": 2.0,
                "negative_prompt": "fog",
                "sampler": "euler",
            }
            | fields
        )
    )
    c = conditioning(pipe, job)
    return np.asarray(sample(pipe, dict(pipe.scheduler.config), job, [c, c], [5, 5], lambda s: None, 2)[0])


def write(folder, path, family, *, fp8: bool = False, all_fp8: bool = False):
    state = transformer_to_original(load(folder).transformer, PREFIX[family])
    if fp8:  # as most fp8 downloads are: the linear layers' weights in e4m3fn, the rest kept wide
        state = {k: v.to(FP8) if v.dim() == 2 and k.endswith(".weight") else v for k, v in state.items()}
    if all_fp8:  # as Comfy-Org's flux1-dev-fp8: every tensor, norms and biases too
        state = {k: v.to(FP8) for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transformer_only_file_on_its_base_gives_the_folders_pixels(folders, tmp_path, family):
    folder = folders[family]
    path = write(folder, tmp_path / f"{family}.safetensors", family)
    assert any(
        k.startswith(PREFIX[family] + ("double_blocks" if "flux" in family else "")) for k in _keys(path)
    )
    loaded = load_flow_checkpoint(path, str(folder), FAMILIES[family], torch.float32, local=True)
    assert np.array_equal(pixels(loaded), pixels(load(folder)))


@pytest.mark.parametrize("family", FAMILIES)
def test_an_fp8_file_samples_as_the_folder_with_fp8_cast_weights(folders, tmp_path, family):
    folder = folders[family]
    path = write(folder, tmp_path / f"{family}-fp8.safetensors", family, fp8=True)
    loaded = load_flow_checkpoint(path, str(folder), FAMILIES[family], torch.float32, local=True)
    stored = [m.weight.dtype for m in loaded.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert FP8 in stored  # kept fp8 in memory, computed wider layer by layer
    reference = load(folder)
    with torch.no_grad():
        for module in reference.transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.to(FP8).float())
    assert np.array_equal(pixels(loaded), pixels(reference))


@pytest.mark.parametrize("family", ["flux1", "zimage"])
def test_a_file_with_every_tensor_in_fp8_samples_as_the_folder_with_those_tensors_fp8_cast(
    folders, tmp_path, family
):
    folder = folders[family]
    path = write(folder, tmp_path / f"{family}-all-fp8.safetensors", family, all_fp8=True)
    loaded = load_flow_checkpoint(path, str(folder), FAMILIES[family], torch.float32, local=True)
    reference = load(folder)
    with torch.no_grad():
        for param in reference.transformer.parameters():
            param.copy_(param.to(FP8).float())
    assert np.array_equal(pixels(loaded), pixels(reference))


def test_a_lora_on_fp8_weights_gives_the_same_pixels_every_time_and_restores_bit_exactly(folders, tmp_path):
    from safetensors.torch import load_file

    from lorafleet.worker.tiny import make_demo_loras

    folder = folders["flux1"]
    path = write(folder, tmp_path / "flux-fp8.safetensors", "flux1", fp8=True)
    pipe = load_flow_checkpoint(path, str(folder), "FluxPipeline", torch.float32, local=True)
    patcher = WeightPatcher({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    loras = make_demo_loras(folder, tmp_path / "loras")
    lora = parse_lora(load_file(str(loras[0])), patcher.index, "kohya", original=patcher.original)
    pristine = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = pixels(pipe)
    patcher.apply([StackEntry(lora, 0.8, 0.8)])
    first = pixels(pipe)
    patched = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    assert all(patched[k].dtype == pristine[k].dtype for k in pristine)  # rounded back to fp8
    patcher.restore()
    assert all(torch.equal(pristine[k].float(), v.float()) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(pixels(pipe), plain)
    patcher.apply([StackEntry(lora, 0.8, 0.8)])
    assert np.array_equal(pixels(pipe), first) and not np.array_equal(first, plain)
    patcher.restore()


def test_a_file_of_another_model_or_cut_short_is_refused_naming_it(folders, tmp_path):
    folder = folders["flux1"]
    state = transformer_to_original(load(folder).transformer)
    truncated = dict(list(state.items())[: len(state) // 2])
    save_file({k: v.contiguous() for k, v in truncated.items()}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(JobFailed, match=r"cut\.safetensors: \d+ of the transformer's tensors are missing"):
        load_flow_checkpoint(
            tmp_path / "cut.safetensors", str(folder), "FluxPipeline", torch.float32, local=True
        )
    other = transformer_to_original(load(folders["qwenimage"]).transformer)
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "qwen.safetensors"))
    with pytest.raises(
        JobFailed, match=r"qwen\.safetensors: tensor .* is not part of a FluxTransformer2DModel"
    ):
        load_flow_checkpoint(
            tmp_path / "qwen.safetensors", str(folder), "FluxPipeline", torch.float32, local=True
        )


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.fixture
def registered(settings, folders, tmp_path):
    """The tiny FLUX.1 folder under models/ and its transformer as a file registered with --base."""
    import shutil

    import redis

    from lorafleet.common.catalog.models import ModelRegistry

    shutil.copytree(folders["flux1"], settings.home / "models" / "tiny-flux1")
    path = write(folders["flux1"], tmp_path / "flux1-dev-tiny.safetensors", "flux1")
    registry = ModelRegistry(settings, redis.Redis.from_url(settings.broker_url))
    return registry, path


def test_models_add_with_base_registers_a_transformer_only_file_that_runs_like_its_folder(
    registered, settings
):
    from lorafleet.producer import Client
    from tests.worker.conftest import make_runner
    from tests.worker.test_runner import pixels as stored_pixels

    registry, path = registered
    ref = registry.register("flux-file", str(path), base="tiny-flux1")
    assert (ref.family.value, ref.config, ref.guidance_embeds) == (
        "flux1",
        str(settings.home / "models" / "tiny-flux1"),
        True,
    )
    assert ref.transformer_width == 32 and ref.single_file
    runner = make_runner(settings)
    job = {
        "prompt": "a lighthouse at night",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
        "cfg_scale": 2.0,
    }
    with Client(settings) as client:
        records = []
        for model in ("flux-file", "tiny-flux1"):
            handle = client.submit(job | {"model": model})
            runner.run(handle.job_id)
            records.append(client.get(handle.job_id))
    assert [r.status.value for r in records] == ["succeeded", "succeeded"], [r.error for r in records]
    assert records[0].job.guidance == 3.5  # the file's guidance embedding, read from its tensors
    assert stored_pixels(records[0], runner) == stored_pixels(records[1], runner)
    from io import BytesIO

    from PIL import Image

    from lorafleet.common.schema.infotext import parse_parameters

    text = Image.open(BytesIO(runner.storage.get(records[0].images[0].key))).text["parameters"]
    fields = parse_parameters(text).fields
    assert fields["Module 1"] == "tiny-flux1" and len(fields["Model hash"]) == 10  # Forge's form
    assert parse_parameters(text).ignored == []


@pytest.mark.parametrize(
    ("base", "words"),
    [
        ("/nowhere/relative/../x", None),
        ("not a name!", "neither a registered model, a folder nor a hub id"),
    ],
)
def test_a_base_that_names_nothing_usable_is_refused_naming_the_option(registered, base, words):
    from lorafleet.common.schema.errors import BadArgument

    registry, path = registered
    if words is None:  # a folder only the workers see: taken as given, checked when loaded
        assert registry.register("flux-file", str(path), base=base).config == base
        return
    with pytest.raises(BadArgument) as caught:
        registry.register("flux-file", str(path), base=base)
    assert caught.value.field == "--base" and words in caught.value.reason
    assert "flux-file" not in registry.registered()


def test_a_base_of_another_family_is_refused_and_nothing_is_registered(registered, folders, settings):
    import shutil

    from lorafleet.common.schema.errors import BadArgument

    registry, path = registered
    shutil.copytree(folders["qwenimage"], settings.home / "models" / "tiny-qwen")
    with pytest.raises(BadArgument) as caught:
        registry.register("flux-file", str(path), base="tiny-qwen")
    assert (
        caught.value.field == "--base"
        and "Qwen-Image" in caught.value.reason
        and "FLUX.1" in caught.value.reason
    )
    assert "flux-file" not in registry.registered()


def test_an_all_in_one_flux_file_runs_with_its_own_text_encoders_and_vae(folders, tmp_path):
    """ComfyUI's all-in-one FLUX.1 file: the base gives only tokenizers and configs."""
    from lorafleet.worker.checkpoint_format import clip_to_original, vae_to_original

    folder = folders["flux1"]
    source = load(folder)
    with torch.no_grad():  # a different text encoder and VAE than the base's, so the file's must be used
        for module in (source.text_encoder, source.text_encoder_2, source.vae):
            for param in module.parameters():
                param.add_(
                    torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05
                )
    state = transformer_to_original(source.transformer, "model.diffusion_model.")
    state |= clip_to_original(source.text_encoder.state_dict(), "text_encoders.clip_l.transformer.")
    t5 = source.text_encoder_2.state_dict()
    state |= {
        f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items() if k != "encoder.embed_tokens.weight"
    }
    vae = vae_to_original(source.vae.state_dict(), dict(source.vae.config))
    state |= {"vae." + k.removeprefix("first_stage_model."): v for k, v in vae.items()}
    path = tmp_path / "flux1-dev-all-in-one.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_flow_checkpoint(path, str(folder), "FluxPipeline", torch.float32, local=True)
    assert np.array_equal(pixels(loaded), pixels(source))
    assert not np.array_equal(pixels(loaded), pixels(load(folder)))


def test_a_transformer_file_in_autoimport_runs_on_the_familys_base_from_settings(folders, settings, tmp_path):
    from lorafleet.producer import Client
    from tests.worker.conftest import make_runner

    settings = settings.model_copy(update={"checkpoint_configs": {"flux1": str(folders["flux1"])}})
    settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    write(folders["flux1"], settings.checkpoints_dir / "flux1-dev-fp8.safetensors", "flux1", fp8=True)
    runner = make_runner(settings)
    with Client(settings) as client:
        handle = client.submit(
            {"model": "flux1-dev-fp8", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
        )
        runner.run(handle.job_id)
        record = client.get(handle.job_id)
    assert record.status.value == "succeeded", record.error
    assert (record.job.steps, record.job.guidance, record.job.sampler.value) == (2, 3.5, "euler")


def test_a_scaled_fp8_file_is_refused_at_registration_naming_the_reason(registered, folders, tmp_path):
    from lorafleet.common.schema.errors import BadArgument

    registry, _ = registered
    state = transformer_to_original(load(folders["flux1"]).transformer, "model.diffusion_model.")
    state = {k: v.to(FP8) if v.dim() == 2 else v for k, v in state.items()}
    state["model.diffusion_model.double_blocks.0.img_attn.proj.scale_weight"] = torch.ones(1)
    state["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=FP8)
    path = tmp_path / "flux1-dev-scaled-fp8.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(BadArgument, match="scaled fp8"):
        registry.register("scaled", str(path), base="tiny-flux1")
    assert "scaled" not in registry.registered()


def test_an_nf4_file_is_refused_at_registration_naming_the_reason(registered, folders, tmp_path):
    from lorafleet.common.schema.errors import BadArgument

    registry, _ = registered
    state = transformer_to_original(load(folders["flux1"]).transformer, "model.diffusion_model.")
    # bitsandbytes' serialization (Forge's flux1-dev-bnb-nf4): packed bytes, absmax, a quant state
    layer = "model.diffusion_model.double_blocks.0.img_attn.proj"
    state[f"{layer}.weight"] = torch.zeros(512, 1, dtype=torch.uint8)
    state[f"{layer}.weight.absmax"] = torch.ones(16)
    state[f"{layer}.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(100, dtype=torch.uint8)
    path = tmp_path / "flux1-dev-bnb-nf4.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(
        BadArgument, match=r"NF4/FP4 \(bitsandbytes\) checkpoint: lorafleet workers do not load"
    ):
        registry.register("nf4", str(path), base="tiny-flux1")
    assert "nf4" not in registry.registered()


def test_a_schnell_file_on_a_dev_base_is_refused_at_registration(registered, folders, settings, tmp_path):
    from lorafleet.common.schema.errors import BadArgument

    registry, _ = registered
    schnell = make_tiny_model(tmp_path / "schnell", family="flux1-schnell")
    path = write(schnell, tmp_path / "flux1-schnell-tiny.safetensors", "flux1")
    with pytest.raises(BadArgument) as caught:
        registry.register("schnell-file", str(path), base="tiny-flux1")
    assert caught.value.field == "--base" and "guidance embedding" in caught.value.reason
    assert registry.register("schnell-file", str(path), base=str(schnell)).guidance_embeds is False
