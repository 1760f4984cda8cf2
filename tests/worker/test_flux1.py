"""FLUX.1 as exactly as SD, on a tiny FLUX.1 pipeline: every wild LoRA format gives the image
an independent float64 merge gives, restore is bit-exact, a job's pixels do not depend on its
companions, and a job runs end to end with its PNG regenerating pixel for pixel."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from lorafleet.common.schema.jobs import GenerationJob, JobStatus
from lorafleet.worker.demo_flow_loras import FLUX1_FORMATS
from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from lorafleet.worker.run.sampling import conditioning, sample
from lorafleet.worker.tiny import make_demo_loras, make_tiny_model
from tests.worker.test_runner import client, pixels, run  # noqa: F401  (client is a fixture)

FLUX = "tiny-flux1"
JOB = dict(
    model=FLUX,
    prompt="a lighthouse at night",
    width=64,
    height=64,
    steps=2,
    seed=7,
    guidance=3.5,
    sampler="euler",
)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux1")
    folder = make_tiny_model(root / FLUX, family="flux1")
    make_demo_loras(folder, root / "loras")
    return folder, root / "loras"


@pytest.fixture(scope="module")
def pipes(flux_folder):
    """Two copies of the pipeline: one patched by lorafleet, one merged here in float64."""
    folder, _ = flux_folder
    ours = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    reference = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    patcher = WeightPatcher(
        {name: getattr(ours, name) for name in ("transformer", "text_encoder", "text_encoder_2")}
    )
    return ours, reference, patcher


# The spec, written out again from BFL's code (not from lorafleet's map): which diffusers
# modules each original layer stacks by rows, in order.
def _spec(transformer) -> dict[str, list[str]]:
    spec = {}
    for n in range(transformer.config.num_layers):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        spec |= {
            f"{d}.img_attn.qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
            f"{d}.txt_attn.qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
            f"{d}.img_attn.proj": [f"{b}.attn.to_out.0"],
            f"{d}.txt_attn.proj": [f"{b}.attn.to_add_out"],
            f"{d}.img_mlp.0": [f"{b}.ff.net.0.proj"],
            f"{d}.img_mlp.2": [f"{b}.ff.net.2"],
            f"{d}.txt_mlp.0": [f"{b}.ff_context.net.0.proj"],
            f"{d}.txt_mlp.2": [f"{b}.ff_context.net.2"],
            f"{d}.img_mod.lin": [f"{b}.norm1.linear"],
            f"{d}.txt_mod.lin": [f"{b}.norm1_context.linear"],
        }
    for n in range(transformer.config.num_single_layers):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        spec |= {
            f"{s}.linear1": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"],
            f"{s}.linear2": [f"{b}.proj_out"],
            f"{s}.modulation.lin": [f"{b}.norm.linear"],
        }
    spec["final_layer.adaLN_modulation.1"] = ["norm_out.linear"]  # (shift, scale): swapped below
    return spec


def _original_delta(state, fmt: str, original: str) -> torch.Tensor | None:
    """The float64 delta a file gives an original (BFL) layer, read here from its keys."""
    s = {k: v.double() for k, v in state.items()}
    flat = "lora_unet_" + original.replace(".", "_")
    if fmt == "kohya" and f"{flat}.lora_down.weight" in s:
        down, up = s[f"{flat}.lora_down.weight"], s[f"{flat}.lora_up.weight"]
        return up @ down * (s[f"{flat}.alpha"].item() / down.shape[0])
    if fmt == "bfl" and f"diffusion_model.{original}.lora_A.weight" in s:
        return s[f"diffusion_model.{original}.lora_B.weight"] @ s[f"diffusion_model.{original}.lora_A.weight"]
    if fmt == "xlabs" and "_attn." in original:
        block, stream, layer = original.split(".")[1], original.split(".")[2][:3], original.split(".")[3]
        key = f"double_blocks.{block}.processor.{layer}_lora{1 if stream == 'img' else 2}"
        return s[f"{key}.up.weight"] @ s[f"{key}.down.weight"]
    if fmt == "lokr" and f"{flat}.lokr_w1" in s:
        w2 = s[f"{flat}.lokr_w2_a"] @ s[f"{flat}.lokr_w2_b"]
        return torch.kron(s[f"{flat}.lokr_w1"], w2) * (
            s[f"{flat}.alpha"].item() / s[f"{flat}.lokr_w2_b"].shape[0]
        )
    if fmt == "loha" and f"{flat}.hada_w1_a" in s:
        first = s[f"{flat}.hada_w1_a"] @ s[f"{flat}.hada_w1_b"]
        second = s[f"{flat}.hada_w2_a"] @ s[f"{flat}.hada_w2_b"]
        return first * second * (s[f"{flat}.alpha"].item() / s[f"{flat}.hada_w1_b"].shape[0])
    return None


def expected_deltas(pipe, state, fmt: str) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> float64 delta of the file, computed without lorafleet's parser."""
    transformer = pipe.transformer
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    s = {k: v.double() for k, v in state.items()}
    if fmt in ("peft", "onetrainer"):
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            if fmt == "peft" and f"transformer.{name}.lora_A.weight" in s:
                deltas[("transformer", name)] = (
                    s[f"transformer.{name}.lora_B.weight"] @ s[f"transformer.{name}.lora_A.weight"]
                )
            flat = "lora_transformer_" + name.replace(".", "_")
            if fmt == "onetrainer" and f"{flat}.lora_down.weight" in s:
                down = s[f"{flat}.lora_down.weight"]
                deltas[("transformer", name)] = (
                    s[f"{flat}.lora_up.weight"] @ down * (s[f"{flat}.alpha"].item() / down.shape[0])
                )
        return deltas
    for original, modules in _spec(transformer).items():
        whole = _original_delta(state, fmt, original)
        if whole is None:
            continue
        if original.startswith("final_layer"):
            half = whole.shape[0] // 2
            deltas[("transformer", modules[0])] = torch.cat([whole[half:], whole[:half]])
            continue
        start = 0
        for module in modules:
            rows = transformer.get_submodule(module).out_features
            deltas[("transformer", module)] = whole[start : start + rows]
            start += rows
        assert start == whole.shape[0], original
    for name, module in pipe.text_encoder.named_modules():
        flat = "lora_te1_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear) and f"{flat}.lora_down.weight" in s:
            down = s[f"{flat}.lora_down.weight"]
            deltas[("text_encoder", name)] = (
                s[f"{flat}.lora_up.weight"] @ down * (s[f"{flat}.alpha"].item() / down.shape[0])
            )
    return deltas


def merged_reference(reference, ours, stack: list[tuple[dict, float]]):
    """``reference`` set to ``ours``' pristine weights plus the stack merged in float64."""
    originals = {}
    for deltas, strength in stack:
        for (component, module), delta in deltas.items():
            weight = getattr(reference, component).get_submodule(module).weight
            key = (component, module)
            if key not in originals:
                originals[key] = (
                    getattr(ours, component).get_submodule(module).weight.detach().double().clone()
                )
            originals[key] = originals[key] + strength * delta.reshape(weight.shape)
    with torch.no_grad():
        for (component, module), value in originals.items():
            getattr(reference, component).get_submodule(module).weight.copy_(value.float())
    return list(originals)


def image(pipe, job: GenerationJob):
    return np.asarray(
        sample(
            pipe,
            dict(pipe.scheduler.config),
            job,
            [conditioning(pipe, job)] * 2,
            [job.seed, job.seed],
            lambda s: None,
            2,
        )[0]
    ).astype(int)


def snapshot(patcher) -> dict[str, torch.Tensor]:
    return {
        f"{name}:{key}": value.detach().clone()
        for name, module in patcher.components.items()
        for key, value in module.state_dict().items()
    }


@pytest.mark.parametrize("fmt", FLUX1_FORMATS)
def test_each_wild_format_at_0_8_gives_the_image_of_an_independent_float64_merge(pipes, flux_folder, fmt):
    ours, reference, patcher = pipes
    _, loras = flux_folder
    state = load_file(str(loras / f"flux1-{fmt}.safetensors"))
    before = snapshot(patcher)
    parsed = parse_lora(state, patcher.index, fmt, original=patcher.original)
    assert parsed.unmatched == []
    expected = expected_deltas(ours, state, fmt)
    assert {(d.target.component, d.target.module) for d in parsed.deltas} == set(expected)
    touched = merged_reference(reference, ours, [(expected, 0.8)])
    try:
        patcher.apply([StackEntry(parsed, 0.8, 0.8)])
        for component, module in touched:
            got = getattr(ours, component).get_submodule(module).weight
            want = getattr(reference, component).get_submodule(module).weight
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        job = GenerationJob(**JOB, cfg_scale=1.0)
        difference = np.abs(image(ours, job) - image(reference, job)).max()
        assert difference <= 1, f"{fmt}: the images differ by {difference} levels"
    finally:
        patcher.restore()
        merged_reference(reference, ours, [])
        with torch.no_grad():
            for component, module in touched:
                getattr(reference, component).get_submodule(module).weight.copy_(
                    getattr(ours, component).get_submodule(module).weight
                )
    after = snapshot(patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_two_lora_stack_equals_the_float64_merge_of_both(pipes, flux_folder):
    ours, reference, patcher = pipes
    _, loras = flux_folder
    kohya = load_file(str(loras / "flux1-kohya.safetensors"))
    bfl = load_file(str(loras / "flux1-bfl.safetensors"))
    stack = [(expected_deltas(ours, kohya, "kohya"), 0.8), (expected_deltas(ours, bfl, "bfl"), -0.5)]
    touched = merged_reference(reference, ours, stack)
    entries = [
        StackEntry(parse_lora(kohya, patcher.index, "kohya"), 0.8, 0.8),
        StackEntry(parse_lora(bfl, patcher.index, "bfl"), -0.5, -0.5),
    ]
    try:
        patcher.apply(entries)
        for component, module in touched:
            got = getattr(ours, component).get_submodule(module).weight
            want = getattr(reference, component).get_submodule(module).weight
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        job = GenerationJob(**JOB, cfg_scale=2.0, negative_prompt="fog")
        assert np.abs(image(ours, job) - image(reference, job)).max() <= 1
    finally:
        patcher.restore()
        with torch.no_grad():
            for component, module in touched:
                getattr(reference, component).get_submodule(module).weight.copy_(
                    getattr(ours, component).get_submodule(module).weight
                )


def test_restore_is_bit_exact_after_1000_stack_switches(pipes, flux_folder):
    _, _, patcher = pipes
    _, loras = flux_folder
    parsed = [
        parse_lora(
            load_file(str(loras / f"flux1-{fmt}.safetensors")), patcher.index, fmt, original=patcher.original
        )
        for fmt in FLUX1_FORMATS
    ]
    before = snapshot(patcher)
    rng = random.Random(3)
    reference: dict[tuple, dict[str, torch.Tensor]] = {}
    for switch in range(1000):
        picked = rng.sample(range(len(parsed)), rng.randint(0, 3))
        weights = tuple(rng.choice([0.35, 0.8, 1.0, -0.5]) for _ in picked)
        patcher.apply([StackEntry(parsed[i], w, w) for i, w in zip(picked, weights)])
        if switch % 50 == 0 or (tuple(picked), weights) in reference:
            state = snapshot(patcher)
            key = (tuple(picked), weights)
            if key in reference:  # the same stack gives the same bits whatever came before
                assert all(torch.equal(reference[key][k], state[k]) for k in state)
            reference[key] = state
    patcher.restore()
    after = snapshot(patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_jobs_pixels_do_not_depend_on_its_batch_companions(pipes):
    ours, _, _ = pipes
    job = GenerationJob(**JOB, cfg_scale=1.5, negative_prompt="fog")
    other = GenerationJob(**(JOB | {"prompt": "a red castle in the snow", "seed": 99}), cfg_scale=1.5)
    config = dict(ours.scheduler.config)
    alone = sample(ours, config, job, [conditioning(ours, job)], [7], lambda s: None, 2)[0]
    beside = sample(
        ours, config, job, [conditioning(ours, job), conditioning(ours, other)], [7, 99], lambda s: None, 2
    )
    assert np.array_equal(np.asarray(alone), np.asarray(beside[0]))
    assert not np.array_equal(np.asarray(beside[0]), np.asarray(beside[1]))


@pytest.fixture
def flux_home(home, flux_folder):
    import shutil

    folder, loras = flux_folder
    shutil.copytree(folder, home / "models" / FLUX)
    for path in loras.glob("*.safetensors"):
        shutil.copy(path, home / "autoimport" / "lora" / path.name)
    return home


def test_a_flux_job_runs_end_to_end_and_its_png_regenerates_pixel_for_pixel(
    flux_home,
    client,  # noqa: F811
    runner,
    tmp_path,
):
    record = run(
        client,
        runner,
        **JOB
        | {
            "prompt": "a (lighthouse:1.2) at night <lora:flux1-kohya:0.8>",
            "negative_prompt": "fog",
            "cfg_scale": 2.0,
            "loras": [{"name": "flux1-bfl", "weight": 0.5}],
        },
    )
    assert record.status is JobStatus.succeeded, record.error
    assert record.job.sampler.value == "euler" and record.job.guidance == 3.5
    assert any("plain words" in w for w in record.warnings)
    png = tmp_path / "flux.png"
    png.write_bytes(runner.storage.get(record.images[0].key))
    job = client.job_from_png(png)
    assert job.guidance == 3.5 and job.cfg_scale == 2.0 and job.model == FLUX
    again = client.submit(job)
    assert runner.run(again.job_id) is JobStatus.succeeded
    assert pixels(client.get(again.job_id), runner) == pixels(record, runner)


def test_dora_on_a_fused_layer_equals_dora_on_the_original_weight(pipes):
    """DoRA's norm is taken over the original (fused) layer's rows, then dealt out."""
    ours, _, patcher = pipes
    attn = ours.transformer.transformer_blocks[0].attn
    fused = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach().double()
    gen = torch.Generator().manual_seed(11)
    down, up = (
        torch.randn(4, fused.shape[1], generator=gen) * 0.05,
        torch.randn(fused.shape[0], 4, generator=gen) * 0.05,
    )
    magnitude = fused.norm(dim=1) * (1 + 0.1 * torch.rand(fused.shape[0], generator=gen, dtype=torch.float64))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    state = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(4.0),
        f"{name}.dora_scale": magnitude.float(),
    }
    merged = fused + up.double() @ down.double()
    directed = merged * (magnitude.float().double() / merged.norm(dim=1))[:, None]
    expected = fused + 0.8 * (directed - fused)  # DoRA at strength s: W0 + s (c (W0 + dW) - W0)
    parsed = parse_lora(state, patcher.index, "kohya", original=patcher.original)
    try:
        patcher.apply([StackEntry(parsed, 0.8, 0.8)])
        got = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach().double()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    finally:
        patcher.restore()


def test_a_control_lora_that_widens_the_input_layer_is_refused_saying_why(pipes):
    from lorafleet.worker.lora.formats import LoraFormatError

    _, _, patcher = pipes
    x_in = patcher.components["transformer"].x_embedder
    state = {  # BFL Control LoRAs train img_in on twice the input channels (image + control)
        "lora_unet_img_in.lora_down.weight": torch.zeros(4, 2 * x_in.in_features),
        "lora_unet_img_in.lora_up.weight": torch.zeros(x_in.out_features, 4),
    }
    with pytest.raises(
        LoraFormatError, match=r"img_in: factors give .*: the LoRA changes the layer.s shape \(a Control LoRA"
    ):
        parse_lora(state, patcher.index, "kohya")


def test_a_prompt_past_t5s_512_tokens_is_cut_with_a_warning_saying_how_many(pipes):
    from lorafleet.worker.run import flow

    ours, _, _ = pipes
    long = " ".join(["zqxj"] * 390)  # letters the tiny T5 has no word for: a token each
    job = GenerationJob(**(JOB | {"prompt": long}), cfg_scale=1.0)
    [note] = flow.prompt_warnings(ours, job)
    count = len(ours.tokenizer_2(long, truncation=False).input_ids)
    assert note.startswith(f"prompt: {count} tokens, {count - 512} past the 512 FLUX.1 reads")
    assert flow.prompt_warnings(ours, GenerationJob(**JOB, cfg_scale=1.0)) == []


def test_sd_parsers_reads_a_flux_png_with_its_distilled_guidance(flux_home, client, runner, tmp_path):  # noqa: F811
    from sd_parsers import ParserManager

    record = run(client, runner, **JOB | {"prompt": "a lighthouse <lora:flux1-peft:0.7>", "guidance": 2.5})
    assert record.status is JobStatus.succeeded, record.error
    png = tmp_path / "flux.png"
    png.write_bytes(runner.storage.get(record.images[0].key))
    theirs = ParserManager().parse(str(png))
    [sampler] = theirs.samplers
    assert sampler.name == "Euler" and sampler.model.name == FLUX
    assert theirs.metadata["Distilled CFG Scale"] == "2.5" and theirs.metadata["Size"] == "64x64"
    assert sampler.prompts[0].value == "a lighthouse <lora:flux1-peft:0.7>"


def test_the_hot_pipeline_counts_every_components_bytes(flux_folder):
    from lorafleet.common.catalog.models import describe_folder
    from lorafleet.worker.pipelines import load_pipeline, pipeline_bytes

    folder, _ = flux_folder
    model = describe_folder(FLUX, folder)
    hot = load_pipeline(model, torch.device("cpu"), torch.float32, text_encoder_device=torch.device("cpu"))
    parts = [hot.pipe.transformer, hot.pipe.text_encoder, hot.pipe.text_encoder_2, hot.pipe.vae]
    weights = sum(p.nbytes for module in parts for p in module.parameters())
    assert hot.nbytes == weights  # nothing patched yet: no pristine copies
    assert pipeline_bytes(model, torch.float32) >= weights  # what the cache plans for before loading
    assert (model.family.value, model.guidance_embeds, model.transformer_width) == ("flux1", True, 32)


def test_a_job_the_producer_could_not_check_fails_at_the_worker_naming_what_flux_lacks(pipes):
    """A hub id or a folder only the workers see has no family at submit: the worker refuses."""
    from lorafleet.common.schema.errors import JobFailed

    ours, _, _ = pipes
    job = GenerationJob(model="owner/flux", prompt="x", sampler="dpmpp_2m_karras", clip_skip=2, job_id="j1")
    with pytest.raises(
        JobFailed,
        match=r"is FLUX.1, which has no sampler dpmpp_2m_karras .*clip_skip 2; register it with its family",
    ):
        conditioning(ours, job)


def test_lokr_and_loha_on_fused_layers_stay_factored(pipes, flux_folder):
    from lorafleet.worker.lora.deltas import RowsDelta

    _, _, patcher = pipes
    _, loras = flux_folder
    for fmt in ("lokr", "loha"):
        state = load_file(str(loras / f"flux1-{fmt}.safetensors"))
        parsed = parse_lora(state, patcher.index, fmt)
        pieces = [d for d in parsed.deltas if isinstance(d, RowsDelta)]
        assert pieces and len(pieces) == len(parsed.deltas)  # no piece made dense at parse time
        # the pieces of one fused layer share that layer's factors, held once
        assert len({id(d.inner) for d in pieces}) == len(
            [k for k in state if k.endswith((".lokr_w1", ".hada_w1_a"))]
        )
        assert parsed.nbytes == sum({id(d.inner): d.inner.nbytes for d in pieces}.values())
