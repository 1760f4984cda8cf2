"""Z-Image, Qwen-Image and FLUX.2 LoRAs as exactly as FLUX.1's, on tiny pipelines: every
format their users bring gives the weights and the image of an independent float64 merge, a
two-LoRA stack too, restore is bit-exact after hundreds of stack switches, and a Qwen-Image
LoRA is refused by the FLUX models."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from lorafleet.common.schema.family import Family
from lorafleet.common.schema.jobs import GenerationJob
from lorafleet.worker.demo_flow_loras import FORMATS
from lorafleet.worker.lora.formats import LoraFormatError, parse_lora
from lorafleet.worker.lora.module_index import ModuleIndex
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from lorafleet.worker.tiny import make_demo_loras, make_tiny_model
from tests.worker.test_flux1 import image, merged_reference, snapshot

FAMILIES = ("zimage", "qwenimage", "flux2")
CASES = [(family, fmt) for family in FAMILIES for fmt in FORMATS[Family(family)]]


# The specs, written out again from each family's original code (not from lorafleet's map):
# which diffusers modules an original layer stacks by rows, in order. Any other layer keeps
# diffusers' name (Qwen-Image's original names are diffusers' own).
def _zimage_spec(transformer) -> dict[str, list[str]]:
    spec = {}
    for stack in ("layers", "noise_refiner", "context_refiner"):
        for n in range(len(getattr(transformer, stack))):
            a = f"{stack}.{n}.attention"
            spec |= {f"{a}.qkv": [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{a}.out": [f"{a}.to_out.0"]}
    return spec


def _flux2_spec(transformer) -> dict[str, list[str]]:
    spec = {"final_layer.adaLN_modulation.1": ["norm_out.linear"]}  # (shift, scale): swapped below
    for n in range(transformer.config.num_layers):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        spec |= {
            f"{d}.img_attn.qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
            f"{d}.txt_attn.qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
            f"{d}.img_attn.proj": [f"{b}.attn.to_out.0"],
            f"{d}.txt_attn.proj": [f"{b}.attn.to_add_out"],
            f"{d}.img_mlp.0": [f"{b}.ff.linear_in"],
            f"{d}.img_mlp.2": [f"{b}.ff.linear_out"],
            f"{d}.txt_mlp.0": [f"{b}.ff_context.linear_in"],
            f"{d}.txt_mlp.2": [f"{b}.ff_context.linear_out"],
        }
    for n in range(transformer.config.num_single_layers):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        spec |= {f"{s}.linear1": [f"{b}.attn.to_qkv_mlp_proj"], f"{s}.linear2": [f"{b}.attn.to_out"]}
    return spec


SPECS = {"zimage": _zimage_spec, "qwenimage": lambda transformer: {}, "flux2": _flux2_spec}
SWAPPED = {"final_layer.adaLN_modulation.1"}  # FLUX.2's: its halves in diffusers' other order

# What each family's demo LoRAs must adapt: the attention and MLP linears of every block.
_ATTENTION = r"attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
BLOCK_LINEARS = {
    "zimage": r"(layers|noise_refiner|context_refiner)\.\d+\."
    r"(attention\.(to_[qkv]|to_out\.0)|feed_forward\.w[123])",
    "qwenimage": rf"transformer_blocks\.\d+\.({_ATTENTION}|(img|txt)_mlp\.net\.(0\.proj|2))",
    "flux2": rf"transformer_blocks\.\d+\.({_ATTENTION}|ff(_context)?\.linear_(in|out))"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
}

# One key each format must hold, as its trainer writes it.
SAMPLE_KEYS = {
    ("zimage", "peft"): "transformer.layers.0.attention.to_q.lora_A.weight",
    ("zimage", "original"): "diffusion_model.layers.0.attention.qkv.lora_A.weight",
    ("zimage", "kohya"): "lora_unet_layers_0_attention_qkv.lora_down.weight",
    ("zimage", "musubi"): "lora_unet_layers_0_attention_to_out_0.lora_up.weight",
    ("zimage", "lokr"): "lora_unet_layers_0_feed_forward_w1.lokr_w1",
    ("qwenimage", "peft"): "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    ("qwenimage", "diffsynth"): "transformer_blocks.1.img_mlp.net.0.proj.lora_B.default.weight",
    ("qwenimage", "kohya"): "lora_unet_transformer_blocks_0_attn_add_k_proj.alpha",
    ("qwenimage", "original"): "diffusion_model.transformer_blocks.0.txt_mlp.net.2.lora_A.weight",
    ("flux2", "peft"): "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight",
    ("flux2", "kohya"): "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight",
    ("flux2", "original"): "diffusion_model.single_blocks.1.linear1.lora_B.weight",
    ("flux2", "lokr"): "lora_unet_double_blocks_1_img_attn_qkv.lokr_w2_b",
    ("flux2", "simpletuner"): "lycoris_transformer_blocks_0_attn_add_v_proj.lokr_w1",
}

ROLES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
    ".lokr_w1": "w1",
    ".lokr_w2_a": "w2_a",
    ".lokr_w2_b": "w2_b",
}


def _file_deltas(state) -> dict[str, torch.Tensor]:
    """Each layer of the file, named as the file writes it -> its float64 delta."""
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        suffix = max((s for s in ROLES if key.endswith(s)), key=len, default=None)
        assert suffix is not None, f"{key}: a tensor of no LoRA role"
        layers[key[: -len(suffix)]][ROLES[suffix]] = tensor.double()
    deltas = {}
    for name, t in layers.items():
        if "w1" in t:
            rank = t["w2_b"].shape[0]
            deltas[name] = torch.kron(t["w1"], t["w2_a"] @ t["w2_b"]) * (t["alpha"].item() / rank)
        else:
            scale = t["alpha"].item() / t["down"].shape[0] if "alpha" in t else 1.0
            deltas[name] = t["up"] @ t["down"] * scale
    return deltas


def _names(transformer, spec: dict[str, list[str]]) -> dict[str, tuple[str, list[str]]]:
    """Every name a file may give a layer -> (the layer, the diffusers modules it stacks)."""
    layers = {n: [n] for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)} | spec
    names: dict[str, tuple[str, list[str]]] = {}
    for layer, modules in layers.items():
        for name in (
            "transformer." + layer,
            "diffusion_model." + layer,
            layer,
            "lora_unet_" + layer.replace(".", "_"),
            "lycoris_" + layer.replace(".", "_"),
        ):
            assert names.setdefault(name, (layer, modules)) == (layer, modules), f"{name} names two layers"
    return names


def expected_deltas(transformer, family: str, state) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module) -> float64 delta of the file, computed without lorafleet's parser."""
    names = _names(transformer, SPECS[family](transformer))
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for name, whole in _file_deltas(state).items():
        assert name in names, f"{name}: no layer of the {family} transformer"
        layer, modules = names[name]
        if layer in SWAPPED:
            half = whole.shape[0] // 2
            whole = torch.cat([whole[half:], whole[:half]])
        start = 0
        for module in modules:
            rows = transformer.get_submodule(module).out_features
            assert ("transformer", module) not in deltas, f"{module} twice"
            deltas[("transformer", module)] = whole[start : start + rows]
            start += rows
        assert start == whole.shape[0], name
    return deltas


@dataclass
class TinyFamily:
    """A family's tiny pipeline twice (one patched by lorafleet, one merged here in float64),
    its demo LoRAs and its image without a LoRA."""

    family: str
    loras: Path
    ours: DiffusionPipeline
    reference: DiffusionPipeline
    patcher: WeightPatcher
    plain: np.ndarray

    def state(self, fmt: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.loras / f"{self.family}-{fmt}.safetensors"))

    def parse(self, fmt: str):
        return parse_lora(self.state(fmt), self.patcher.index, fmt, original=self.patcher.original)


def job(family: str, **extra) -> GenerationJob:
    return GenerationJob(
        model=f"tiny-{family}",
        prompt="a lighthouse at night",
        width=64,
        height=64,
        steps=2,
        seed=7,
        sampler="euler",
        **extra,
    )


def _load(folder: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family -> its TinyFamily, built on first use."""
    root = tmp_path_factory.mktemp("flow-families")
    built: dict[str, TinyFamily] = {}

    def get(family: str) -> TinyFamily:
        if family not in built:
            folder = make_tiny_model(root / f"tiny-{family}", family=family)
            make_demo_loras(folder, root / f"{family}-loras")
            ours, reference = _load(folder), _load(folder)
            patcher = WeightPatcher({"transformer": ours.transformer, "text_encoder": ours.text_encoder})
            plain = image(ours, job(family, cfg_scale=1.0))
            built[family] = TinyFamily(family, root / f"{family}-loras", ours, reference, patcher, plain)
        return built[family]

    return get


def _assert_weights_match(built: TinyFamily, touched) -> None:
    for component, module in touched:
        got = getattr(built.ours, component).get_submodule(module).weight
        want = getattr(built.reference, component).get_submodule(module).weight
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _reset(built: TinyFamily, touched) -> None:
    """Restore lorafleet's pipeline and set the reference's weights back to pristine."""
    built.patcher.restore()
    with torch.no_grad():
        for component, module in touched:
            getattr(built.reference, component).get_submodule(module).weight.copy_(
                getattr(built.ours, component).get_submodule(module).weight
            )


@pytest.mark.parametrize("family,fmt", CASES)
def test_each_format_at_0_8_gives_the_image_of_an_independent_float64_merge(families, family, fmt):
    built = families(family)
    state = built.state(fmt)
    assert SAMPLE_KEYS[(family, fmt)] in state
    before = snapshot(built.patcher)
    parsed = built.parse(fmt)
    assert parsed.unmatched == []
    expected = expected_deltas(built.ours.transformer, family, state)
    linears = {
        ("transformer", name)
        for name, module in built.ours.transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS[family], name)
    }
    assert set(expected) == linears, "the file adapts the attention and MLP linears of every block"
    assert {(d.target.component, d.target.module) for d in parsed.deltas} == set(expected)
    touched = merged_reference(built.reference, built.ours, [(expected, 0.8)])
    try:
        built.patcher.apply([StackEntry(parsed, 0.8, 0.8)])
        _assert_weights_match(built, touched)
        patched = image(built.ours, job(family, cfg_scale=1.0))
        difference = np.abs(patched - image(built.reference, job(family, cfg_scale=1.0))).max()
        assert difference <= 1, f"{family}-{fmt}: the images differ by {difference} levels"
        assert not np.array_equal(patched, built.plain), "the LoRA changes the image"
    finally:
        _reset(built, touched)
    after = snapshot(built.patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)


STACKS = {"zimage": ("kohya", "lokr"), "qwenimage": ("kohya", "diffsynth"), "flux2": ("original", "lokr")}
"""A fused-name file and one of another naming or kind, per family."""


@pytest.mark.parametrize("family", FAMILIES)
def test_a_two_lora_stack_equals_the_float64_merge_of_both(families, family):
    built = families(family)
    first, second = STACKS[family]
    transformer = built.ours.transformer
    stack = [
        (expected_deltas(transformer, family, built.state(first)), 0.8),
        (expected_deltas(transformer, family, built.state(second)), -0.5),
    ]
    touched = merged_reference(built.reference, built.ours, stack)
    try:
        built.patcher.apply(
            [
                StackEntry(built.parse(first), 0.8, 0.8),
                StackEntry(built.parse(second), -0.5, -0.5),
            ]
        )
        _assert_weights_match(built, touched)
        guided = job(family, cfg_scale=2.0, negative_prompt="fog")
        assert np.abs(image(built.ours, guided) - image(built.reference, guided)).max() <= 1
    finally:
        _reset(built, touched)


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_is_bit_exact_after_300_stack_switches(families, family):
    built = families(family)
    parsed = [built.parse(fmt) for fmt in FORMATS[Family(family)]]
    before = snapshot(built.patcher)
    rng = random.Random(5)
    seen: dict[tuple, dict[str, torch.Tensor]] = {}
    for switch in range(300):
        picked = rng.sample(range(len(parsed)), rng.randint(0, 3))
        weights = tuple(rng.choice([0.35, 0.8, 1.0, -0.5]) for _ in picked)
        built.patcher.apply([StackEntry(parsed[i], w, w) for i, w in zip(picked, weights)])
        key = (tuple(picked), weights)
        if switch % 30 == 0 or key in seen:
            state = snapshot(built.patcher)
            if key in seen:  # the same stack gives the same bits whatever came before
                assert all(torch.equal(seen[key][k], state[k]) for k in state)
            seen[key] = state
    built.patcher.restore()
    after = snapshot(built.patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def flux1_index(tmp_path_factory) -> ModuleIndex:
    folder = make_tiny_model(tmp_path_factory.mktemp("flux1") / "tiny-flux1", family="flux1")
    pipe = _load(folder)
    return ModuleIndex({n: getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2")})


@pytest.mark.parametrize("fmt", FORMATS[Family.qwenimage])
@pytest.mark.parametrize("model", ["flux1", "flux2"])
def test_a_qwen_image_lora_is_refused_by_the_flux_models(families, flux1_index, model, fmt):
    """Its MLP names are no FLUX layer's; its attention names are (``transformer_blocks.N.attn``),
    but not its shapes here (at full size both are 3072 wide: the catalog's family check
    refuses such a file at submit)."""
    state = families("qwenimage").state(fmt)
    index = flux1_index if model == "flux1" else families("flux2").patcher.index
    with pytest.raises(LoraFormatError, match="factors give a"):
        parse_lora(state, index, fmt)
    mlp = {key: tensor for key, tensor in state.items() if "_mlp" in key}
    with pytest.raises(LoraFormatError, match="no key of this"):
        parse_lora(mlp, index, fmt)


SIDE_FORMATS = {"flux1": "bfl", "zimage": "original", "qwenimage": "original", "flux2": "original"}
"""A low-rank file in the original code's names per family (fused layers: side paths on pieces)."""


@pytest.mark.parametrize("family", tuple(SIDE_FORMATS))
def test_side_paths_give_the_merged_image_up_to_rounding_and_write_no_weight(families, family):
    from lorafleet.worker.lora.side_paths import SidePaths

    built = families(family)
    parsed = built.parse(SIDE_FORMATS[family])
    before = snapshot(built.patcher)
    guided = job(family, cfg_scale=2.0, negative_prompt="fog")  # true CFG: two calls of the rows
    built.patcher.apply([StackEntry(parsed, 0.8, 0.0)])
    try:
        merged = image(built.ours, guided)
    finally:
        built.patcher.restore()
    denoiser = {"transformer": built.ours.transformer}
    with SidePaths.build(denoiser, [[(parsed, 0.8)], [(parsed, 0.8)]]).attached():
        side = image(built.ours, guided)
    with SidePaths.build(denoiser, [[(parsed, 0.8)], []]).attached():  # its companion: no LoRA
        mixed = image(built.ours, guided)
    assert np.array_equal(side, mixed), "a row's image does not depend on the other row's stack"
    assert np.abs(side - merged).max() <= 2, "side paths and the merge differ only by rounding"
    assert not np.array_equal(side, built.plain)
    after = snapshot(built.patcher)
    assert all(torch.equal(before[k], after[k]) for k in before)
