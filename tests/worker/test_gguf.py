"""LoRAs on a GGUF-quantized base: a tiny FLUX.1 transformer written as a Q8_0 GGUF file (with
the gguf package) loads quantized, samples as its dequantized weights, takes a LoRA only
beside its weights (the image of the dequantized weights plus the float64 delta, within
rounding), and after 100 LoRA jobs through the runner its quantized bytes are the file's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.errors import JobFailed, JobRejected
from lorafleet.common.schema.jobs import GenerationJob, JobStatus, LoraMode
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.gguf_checkpoints import (
    dequantized,
    is_quantized,
    load_gguf_checkpoint,
    write_gguf,
)
from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.module_index import ModuleIndex
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from lorafleet.worker.lora.side_paths import SidePaths
from lorafleet.worker.tiny import make_demo_loras, make_tiny_model
from tests.worker.conftest import dropped_in
from tests.worker.test_flux1 import expected_deltas, image, merged_reference
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

MODEL = "tiny-flux1-q8"
JOB = dict(
    model=MODEL,
    prompt="a lighthouse at night",
    width=64,
    height=64,
    steps=2,
    seed=7,
    guidance=3.5,
    sampler="euler",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny FLUX.1 folder, its demo LoRAs, and its transformer as a Q8_0 GGUF file."""
    root = tmp_path_factory.mktemp("gguf")
    folder = make_tiny_model(root / "tiny-flux1", family="flux1")
    loras = make_demo_loras(folder, root / "loras")
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    path = write_gguf(pipe.transformer, root / f"{MODEL}.gguf", "Q8_0")
    return folder, {p.stem: p for p in loras}, path


def _plain(folder, weights: dict[str, torch.Tensor] | None = None) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if weights:
        state = pipe.transformer.state_dict()
        pipe.transformer.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return pipe


@pytest.fixture(scope="module")
def pipes(built):
    """The GGUF pipeline, and a plain one whose weights are the file's dequantized values."""
    folder, _, path = built
    quantized = load_gguf_checkpoint(path, str(folder), "FluxPipeline", torch.float32, local=True)
    quantized.set_progress_bar_config(disable=True)
    return quantized, _plain(folder, dequantized(quantized.transformer))


def _reloaded(built):
    folder, _, path = built
    return load_gguf_checkpoint(path, str(folder), "FluxPipeline", torch.float32, local=True)


def _bytes(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if is_quantized(p)}


def test_a_q8_0_transformer_stays_quantized_and_samples_as_its_dequantized_weights(pipes, built):
    quantized, reference = pipes
    stored = _bytes(quantized.transformer)
    assert len(stored) > 10 and all(p.dtype == torch.uint8 for p in stored.values())
    assert {p.quant_type.name for p in stored.values()} == {"Q8_0"}
    job = GenerationJob(**JOB, cfg_scale=1.0)
    assert np.abs(image(quantized, job) - image(reference, job)).max() <= 1
    # and Q8_0 is not a no-op: the folder's own weights give another image
    assert not np.array_equal(image(_plain(built[0]), job), image(quantized, job))


def test_a_lora_beside_the_quantized_weights_gives_the_float64_reference(pipes, built):
    quantized, reference = pipes
    _, loras, _ = built
    before = _bytes(quantized.transformer)
    state = load_file(str(loras["flux1-bfl"]))
    index = ModuleIndex({"transformer": quantized.transformer})
    parsed = parse_lora(state, index, "bfl")
    assert parsed.unmatched == []
    # the reference: dequantized weights plus the file's delta, merged in float64
    expected = {k: v for k, v in expected_deltas(quantized, state, "bfl").items() if k[0] == "transformer"}
    touched = merged_reference(reference, reference, [(expected, 0.8)])
    assert touched
    job = GenerationJob(**JOB, cfg_scale=2.0, negative_prompt="fog")  # true CFG: rows doubled
    with SidePaths.build(
        {"transformer": quantized.transformer}, [[(parsed, 0.8)], [(parsed, 0.8)]]
    ).attached():
        side = image(quantized, job)
    want = image(reference, job)
    assert np.abs(side - want).max() <= 2, (
        "side paths on GGUF weights differ from the reference beyond rounding"
    )
    assert not np.array_equal(side, image(quantized, job)), "the LoRA changed nothing"
    after = _bytes(quantized.transformer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_patcher_never_merges_into_a_quantized_weight(pipes, built):
    quantized, _ = pipes
    _, loras, _ = built
    patcher = WeightPatcher({"transformer": quantized.transformer})
    parsed = parse_lora(load_file(str(loras["flux1-peft"])), patcher.index, "peft")
    before = _bytes(quantized.transformer)
    with pytest.raises(JobFailed, match="GGUF-quantized weight: requantizing a merged LoRA would be lossy"):
        patcher.apply([StackEntry(parsed, 0.8, 0.8)])
    assert all(torch.equal(before[k], v) for k, v in _bytes(quantized.transformer).items())


@pytest.fixture
def settings(settings, built) -> Settings:  # conftest's, with the GGUF model
    folder, loras, path = built
    return dropped_in(
        settings,
        loras=loras.values(),
        checkpoints=[path],
        checkpoint_configs={"flux1": str(folder)},  # text encoders, tokenizers and VAE
    )


def test_a_gguf_model_takes_loras_beside_its_weights_only(settings, client):  # noqa: F811
    job = JOB | {"loras": [{"name": "flux1-peft", "weight": 0.8}]}
    record = client.get(client.submit(job).job_id)
    assert record.job.lora_mode is LoraMode.side  # the fleet's default is merge
    with pytest.raises(JobRejected) as merge:
        client.submit(job | {"lora_mode": "merge"})
    assert merge.value.field == "lora_mode" and "GGUF-quantized" in merge.value.reason
    with pytest.raises(JobRejected) as lokr:
        client.submit(JOB | {"loras": [{"name": "flux1-lokr"}]})
    assert lokr.value.field == "loras[0]" or lokr.value.field.startswith("loras")
    assert "has no side path" in lokr.value.reason and "GGUF" in lokr.value.reason


def test_models_add_takes_a_gguf_file_with_a_base_and_refuses_a_truncated_one(
    settings, built, tmp_path, redis_proc
):
    folder, _, path = built
    registry = ModelRegistry(settings, redis_proc.client())
    ref = registry.register("my-q8", str(path), base=str(folder))
    assert (ref.family.value, ref.quantized, ref.guidance_embeds) == ("flux1", True, True)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(Exception, match=r"cut\.gguf: not a readable GGUF file"):
        registry.register("cut", str(truncated), base=str(folder))
    assert "cut" not in registry.registered()


def test_100_lora_jobs_leave_the_quantized_bytes_as_the_file_holds_them(settings, client, runner, built):  # noqa: F811
    _, _, path = built
    stacks = [
        [{"name": "flux1-peft", "weight": 0.8}],
        [{"name": "flux1-bfl", "weight": -0.5}],
        [{"name": "flux1-kohya", "weight": 1.0}, {"name": "flux1-peft", "weight": 0.3}],
        [],
    ]
    handles = [
        client.submit(JOB | {"seed": n, "steps": 1, "loras": stacks[n % len(stacks)]}) for n in range(100)
    ]
    for handle in handles:  # the runner takes the waiting jobs along: mixed calls
        if not client.get(handle.job_id).status.final:
            runner.run(handle.job_id)
    records = [client.get(h.job_id) for h in handles]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records if r.error][:3]
    assert {r.job.lora_mode for r in records} == {LoraMode.side}
    [hot] = runner.pipelines.loaded()
    held = _bytes(hot.pipe.transformer)
    assert len(held) == len(_bytes(_reloaded(built).transformer))
    reloaded = _bytes(_reloaded(built).transformer)
    assert set(held) == set(reloaded)
    assert all(torch.equal(held[k], reloaded[k]) for k in held), "a quantized weight was written"


@pytest.mark.parametrize("family", ["zimage", "qwenimage", "flux2"])
def test_every_flow_family_reads_its_gguf_file_and_samples_as_its_dequantized_weights(family, tmp_path):
    from lorafleet.common.catalog.checkpoints import describe_checkpoint

    folder = make_tiny_model(tmp_path / f"tiny-{family}", family=family)
    plain = _plain(folder)
    path = write_gguf(plain.transformer, tmp_path / f"{family}-q8.gguf", "Q8_0")
    assert describe_checkpoint(path).family.value == family
    quantized = load_gguf_checkpoint(path, str(folder), type(plain).__name__, torch.float32, local=True)
    quantized.set_progress_bar_config(disable=True)
    assert _bytes(quantized.transformer), "nothing was quantized"
    reference = _plain(folder, dequantized(quantized.transformer))
    job = GenerationJob(
        model=f"tiny-{family}", prompt="a lighthouse", width=64, height=64, steps=2, seed=7, sampler="euler"
    )
    job.cfg_scale = 1.0
    assert np.abs(image(quantized, job) - image(reference, job)).max() <= 1


def test_a_q4_k_file_samples_as_its_dequantized_weights_and_takes_a_lora_beside_them(built, tmp_path):
    """Q4_K blocks hold 256 values: a FLUX.1 transformer 256 wide (the tiny one is 32)."""
    from diffusers import FluxTransformer2DModel

    folder, loras, _ = built
    wide = _plain(folder)
    torch.manual_seed(0)
    wide.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[16, 48, 64],
        guidance_embeds=True,
    )
    wide.save_pretrained(str(tmp_path / "wide-flux1"))
    path = write_gguf(wide.transformer, tmp_path / "wide-q4k.gguf", "Q4_K")
    quantized = load_gguf_checkpoint(path, str(tmp_path / "wide-flux1"), "FluxPipeline", torch.float32, True)
    quantized.set_progress_bar_config(disable=True)
    stored = _bytes(quantized.transformer)
    assert {p.quant_type.name for p in stored.values()} == {"Q4_K"}
    reference = _plain(tmp_path / "wide-flux1", dequantized(quantized.transformer))
    job = GenerationJob(**JOB, cfg_scale=1.0)
    assert np.abs(image(quantized, job) - image(reference, job)).max() <= 1
    # a LoRA of this width, beside the Q4_K weights: the dequantized weights plus its delta
    make_demo_loras(tmp_path / "wide-flux1", tmp_path / "wide-loras")
    state = load_file(str(tmp_path / "wide-loras" / "flux1-peft.safetensors"))
    parsed = parse_lora(state, ModuleIndex({"transformer": quantized.transformer}), "peft")
    expected = {k: v for k, v in expected_deltas(quantized, state, "peft").items() if k[0] == "transformer"}
    merged_reference(reference, reference, [(expected, 0.8)])
    plain = image(quantized, job)
    with SidePaths.build({"transformer": quantized.transformer}, [[(parsed, 0.8)]] * 2).attached():
        side = image(quantized, job)
    assert np.abs(side - image(reference, job)).max() <= 2
    assert not np.array_equal(side, plain), "the LoRA changed nothing"
    assert all(torch.equal(stored[k], v) for k, v in _bytes(quantized.transformer).items())


def test_stable_diffusion_cpp_style_1d_pad_tokens_and_bf16_tensors_load_as_values(tmp_path):
    """stable-diffusion.cpp writes Z-Image's pad tokens 1-D, and BF16 tensors reach diffusers'
    reader as blocks: neither may be taken for a quantized Linear weight."""
    import gguf

    from lorafleet.worker.flow_checkpoints import transformer_to_original

    folder = make_tiny_model(tmp_path / "tiny-zimage", family="zimage")
    plain = _plain(folder)
    writer = gguf.GGUFWriter(str(tmp_path / "z.gguf"), "lumina2")
    for name, tensor in transformer_to_original(plain.transformer).items():
        values = tensor.detach().float().numpy()
        if name.endswith("pad_token"):
            values = values.reshape(-1)  # (1, width) stored as (width,)
        if name.endswith(".weight") and values.ndim == 2 and values.shape[1] % 32 == 0:
            writer.add_tensor(
                name,
                gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:  # everything else BF16 (biases, norms, pad tokens)
            bf16 = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    quantized = load_gguf_checkpoint(tmp_path / "z.gguf", str(folder), "ZImagePipeline", torch.float32, True)
    quantized.set_progress_bar_config(disable=True)
    transformer = quantized.transformer
    assert transformer.x_pad_token.shape == plain.transformer.x_pad_token.shape
    assert not any(is_quantized(p) for n, p in transformer.named_parameters() if not n.endswith(".weight"))
    values = {n: p.detach() for n, p in transformer.named_parameters() if not is_quantized(p)}
    reference = _plain(folder, dequantized(transformer) | values)
    job = GenerationJob(
        model="tiny-zimage", prompt="a lighthouse", width=64, height=64, steps=2, seed=7, sampler="euler"
    )
    job.cfg_scale = 1.0
    assert np.abs(image(quantized, job) - image(reference, job)).max() <= 1


def test_a_gguf_of_a_type_the_workers_cannot_read_is_refused_at_registration(tmp_path):
    import gguf

    from lorafleet.common.catalog.checkpoints import describe_checkpoint
    from lorafleet.common.schema.errors import FileRefused

    folder = make_tiny_model(tmp_path / "tiny-flux1", family="flux1")
    path = write_gguf(_plain(folder).transformer, tmp_path / "ok.gguf")
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "flux")
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    kind = gguf.GGMLQuantizationType.IQ2_XXS
    writer.add_tensor("extra.weight", np.zeros((1, gguf.GGML_QUANT_SIZES[kind][1]), np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FileRefused, match="IQ2_XXS, which lorafleet's workers cannot dequantize"):
        describe_checkpoint(tmp_path / "iq2.gguf")


def test_a_safetensors_and_a_gguf_of_one_stem_are_each_named_by_their_file(settings, built, redis_proc):
    folder, _, path = built
    main = settings.home / "autoimport" / "main"
    from tests.worker.test_flow_checkpoints import write

    write(folder, main / f"{MODEL}.safetensors", "flux1")  # beside the fixture's tiny-flux1-q8.gguf
    registry = ModelRegistry(settings, redis_proc.client())
    assert {f"{MODEL}.gguf", f"{MODEL}.safetensors"} <= set(registry.local_names())
    assert registry.get(f"{MODEL}.gguf").quantized and not registry.get(f"{MODEL}.safetensors").quantized
    with pytest.raises(Exception, match=r"names tiny-flux1-q8\.safetensors and tiny-flux1-q8\.gguf"):
        registry.get(MODEL)


def test_a_gguf_only_the_workers_see_keeps_its_base_and_family(settings, built, redis_proc):
    folder, _, _ = built
    registry = ModelRegistry(settings, redis_proc.client())
    ref = registry.register("remote-q8", "/srv/models/flux1-dev-Q8_0.gguf", base=str(folder))
    assert (ref.family.value, ref.config, ref.quantized) == ("flux1", str(folder), True)
    again = registry.get("remote-q8")
    assert (again.family.value, again.config, again.quantized) == ("flux1", str(folder), True)
