"""For every LoRA format, the merged weight equals an independent computation from the file.

Each test writes a real .safetensors file in one format, applies it through the worker's
parser and patcher at some strength, and compares every touched parameter with W₀ plus the
format's delta computed here another way: in float64, with numpy's kron, per kernel
position, from the formulas the formats publish. Then restore must give W₀ back, bit-exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.common.catalog.lora_files import describe_file
from lorafleet.common.catalog.models import ModelRegistry
from lorafleet.common.schema.settings import Settings
from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.patcher import StackEntry
from lorafleet.worker.pipelines import load_pipeline
from tests.conftest import TINY_XL
from tests.worker.conftest import assert_same, snapshot

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
CONV = "down_blocks.1.resnets.0.conv2"  # 3x3, 64 -> 64
PROJ = "down_blocks.0.attentions.0.proj_in"  # 1x1 conv in SD1.5


def flat(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def weight(hot, module: str, param: str = "weight") -> torch.Tensor:
    return getattr(hot.patcher.components["unet"].get_submodule(module), param).detach()


def apply_file(hot, tmp_path, state, strength, fmt, metadata=None):
    path = tmp_path / f"{fmt}.safetensors"
    save_file(state, str(path), metadata=metadata or {})
    info = describe_file(path)
    lora = parse_lora(
        load_file(str(path)),
        hot.patcher.index,
        info.format,
        metadata=info.metadata,
        original=hot.patcher.original,
    )
    hot.patcher.apply([StackEntry(lora, strength, strength)])
    return info, lora


def check(hot, before, expected: dict[str, torch.Tensor], atol=2e-6):
    try:
        after = snapshot(hot)
        for key, value in expected.items():
            got = after[f"unet:{key}"].double()
            assert torch.allclose(got, value.reshape(got.shape), rtol=0, atol=atol), (
                key,
                (got - value.reshape(got.shape)).abs().max(),
            )
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed <= {f"unet:{k}" for k in expected}, changed - {f"unet:{k}" for k in expected}
    finally:
        hot.patcher.restore()
    assert_same(hot, before)


def w0(before, module, param="weight") -> torch.Tensor:
    return before[f"unet:{module}.{param}"].double()


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.1


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(7)


@pytest.fixture(autouse=True)
def always_restore(hot):
    """A failing assertion must not leave the module's shared pipeline patched."""
    yield
    hot.patcher.restore()


def test_loha_linear_and_conv(hot, tmp_path, gen):
    before = snapshot(hot)
    state, expected = {}, {}
    for module, r in ((ATTN, 4), (CONV, 3)):
        shape = tuple(weight(hot, module).shape)
        out, rest = shape[0], int(np.prod(shape[1:]))
        parts = {
            n: rand(*s, gen=gen)
            for n, s in (
                ("hada_w1_a", (out, r)),
                ("hada_w1_b", (r, *shape[1:])),
                ("hada_w2_a", (out, r)),
                ("hada_w2_b", (r, *shape[1:])),
            )
        }
        for n, t in parts.items():
            state[f"{flat(module)}.{n}"] = t
        state[f"{flat(module)}.alpha"] = torch.tensor(2.0)
        d = lambda a, b: parts[a].double() @ parts[b].double().reshape(r, rest)  # noqa: E731
        expected[f"{module}.weight"] = w0(before, module).reshape(out, rest) + 0.6 * (2.0 / r) * d(
            "hada_w1_a", "hada_w1_b"
        ) * d("hada_w2_a", "hada_w2_b")
    info, _ = apply_file(hot, tmp_path, state, 0.6, "loha")
    assert info.format == "lycoris-loha"
    check(hot, before, expected)


def test_loha_with_tucker_cores(hot, tmp_path, gen):
    before = snapshot(hot)
    out, cin, kh, kw = weight(hot, CONV).shape
    r = 3
    t = {
        n: rand(*s, gen=gen)
        for n, s in (
            ("hada_t1", (r, r, kh, kw)),
            ("hada_t2", (r, r, kh, kw)),
            ("hada_w1_a", (r, out)),
            ("hada_w1_b", (r, cin)),
            ("hada_w2_a", (r, out)),
            ("hada_w2_b", (r, cin)),
        )
    }
    state = {f"{flat(CONV)}.{n}": v for n, v in t.items()}
    expected = w0(before, CONV).clone()
    for h in range(kh):
        for w in range(kw):
            first = t["hada_w1_a"].double().T @ t["hada_t1"][:, :, h, w].double() @ t["hada_w1_b"].double()
            second = t["hada_w2_a"].double().T @ t["hada_t2"][:, :, h, w].double() @ t["hada_w2_b"].double()
            expected[:, :, h, w] += 1.0 * first * second  # no alpha: scale 1
    apply_file(hot, tmp_path, state, 1.0, "loha-tucker")
    check(hot, before, {f"{CONV}.weight": expected})


@pytest.mark.parametrize(
    "variant", ["full-w1-lowrank-w2", "lowrank-both", "full-both", "conv-full", "conv-tucker"]
)
def test_lokr(hot, tmp_path, gen, variant):
    before = snapshot(hot)
    module = CONV if variant.startswith("conv") else FF
    shape = tuple(weight(hot, module).shape)
    out, cin = shape[:2]
    a, c = 4, 4
    b, d = out // a, cin // c
    k = shape[2:]
    r = 2
    t: dict[str, torch.Tensor] = {}
    if variant == "lowrank-both":
        t["lokr_w1_a"], t["lokr_w1_b"] = rand(a, r, gen=gen), rand(r, c, gen=gen)
    else:
        t["lokr_w1"] = rand(a, c, gen=gen)
    if variant in ("full-w1-lowrank-w2", "lowrank-both"):
        t["lokr_w2_a"], t["lokr_w2_b"] = rand(b, r, gen=gen), rand(r, d, gen=gen)
    elif variant == "conv-tucker":
        t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"] = (
            rand(r, r, *k, gen=gen),
            rand(r, b, gen=gen),
            rand(r, d, gen=gen),
        )
    else:
        t["lokr_w2"] = rand(b, d, *k, gen=gen)
    t["alpha"] = torch.tensor(1.0)
    state = {f"{flat(module)}.{n}": v for n, v in t.items()}
    w1 = t["lokr_w1"].double() if "lokr_w1" in t else t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].double()
    elif "lokr_t2" in t:
        w2 = torch.zeros(b, d, *k, dtype=torch.float64)
        for h in range(k[0]):
            for w in range(k[1]):
                w2[:, :, h, w] = (
                    t["lokr_w2_a"].double().T @ t["lokr_t2"][:, :, h, w].double() @ t["lokr_w2_b"].double()
                )
    else:
        w2 = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double()
    decomposed = any(n.endswith(("_a", "_b")) for n in t)
    scale = (1.0 / r) if decomposed else 1.0
    w1n = w1.numpy().reshape(a, c, *([1] * len(k)))
    delta = torch.from_numpy(np.kron(w1n, w2.numpy())) * scale
    apply_file(hot, tmp_path, state, 0.8, "lokr")
    check(hot, before, {f"{module}.weight": w0(before, module) + 0.8 * delta.reshape(shape)})


def test_full_weight_and_bias_diffs(hot, tmp_path, gen):
    before = snapshot(hot)
    diff = rand(*weight(hot, FF).shape, gen=gen)
    diff_b = rand(*weight(hot, FF, "bias").shape, gen=gen)
    state = {f"{flat(FF)}.diff": diff, f"{flat(FF)}.diff_b": diff_b}
    info, _ = apply_file(hot, tmp_path, state, 0.5, "full")
    assert info.format == "full-diff"
    check(
        hot,
        before,
        {
            f"{FF}.weight": w0(before, FF) + 0.5 * diff.double(),
            f"{FF}.bias": w0(before, FF, "bias") + 0.5 * diff_b.double(),
        },
    )


def test_locon_with_a_tucker_mid(hot, tmp_path, gen):
    before = snapshot(hot)
    out, cin, kh, kw = weight(hot, CONV).shape
    r = 4
    down, mid, up = rand(r, cin, 1, 1, gen=gen), rand(r, r, kh, kw, gen=gen), rand(out, r, 1, 1, gen=gen)
    state = {
        f"{flat(CONV)}.lora_down.weight": down,
        f"{flat(CONV)}.lora_mid.weight": mid,
        f"{flat(CONV)}.lora_up.weight": up,
        f"{flat(CONV)}.alpha": torch.tensor(8.0),
    }
    expected = w0(before, CONV).clone()
    for h in range(kh):
        for w in range(kw):
            expected[:, :, h, w] += (
                0.7 * 2.0 * (up[:, :, 0, 0].double() @ mid[:, :, h, w].double() @ down[:, :, 0, 0].double())
            )
    apply_file(hot, tmp_path, state, 0.7, "locon-tucker")
    check(hot, before, {f"{CONV}.weight": expected})


def _dora_expected(
    w_0: torch.Tensor, inner: torch.Tensor, magnitude: torch.Tensor, strength: float, per_row: bool
):
    merged = w_0 + inner
    if per_row:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        norm = (
            merged.transpose(0, 1)
            .reshape(merged.shape[1], -1)
            .norm(dim=1)
            .reshape(1, -1, *[1] * (merged.dim() - 2))
        )
    dora = magnitude.double().reshape(norm.shape) * merged / norm
    return w_0 + strength * (dora - w_0)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("module", [ATTN, CONV])
def test_dora_kohya_style(hot, tmp_path, gen, per_row, module):
    before = snapshot(hot)
    shape = tuple(weight(hot, module).shape)
    out, cin = shape[:2]
    r = 4
    down, up = rand(r, *shape[1:], gen=gen), rand(out, r, *([1] * (len(shape) - 2)), gen=gen)
    base = w0(before, module)
    inner = (0.5 * (up.double().reshape(out, r) @ down.double().reshape(r, -1))).reshape(shape)
    merged = base + inner
    # Magnitudes near the merged norms, different per row or channel, so the axis matters.
    if per_row:
        norms = merged.reshape(out, -1).norm(dim=1)
        magnitude = (norms * (0.5 + torch.rand(out, generator=gen))).reshape(out, *[1] * (len(shape) - 1))
    else:
        norms = merged.transpose(0, 1).reshape(cin, -1).norm(dim=1)
        magnitude = (norms * (0.5 + torch.rand(cin, generator=gen))).reshape(1, cin, *[1] * (len(shape) - 2))
    state = {
        f"{flat(module)}.lora_down.weight": down,
        f"{flat(module)}.lora_up.weight": up,
        f"{flat(module)}.alpha": torch.tensor(2.0),
        f"{flat(module)}.dora_scale": magnitude.float(),
    }
    info, _ = apply_file(hot, tmp_path, state, 0.9, "dora")
    assert info.format == ("kohya-locon+dora" if module == CONV else "kohya-lora+dora")
    check(hot, before, {f"{module}.weight": _dora_expected(base, inner, magnitude, 0.9, per_row)}, atol=5e-6)


def test_dora_peft_magnitude_vector_at_full_strength(hot, tmp_path, gen):
    before = snapshot(hot)
    out, cin = weight(hot, ATTN).shape
    a, b = rand(8, cin, gen=gen), rand(out, 8, gen=gen)
    magnitude = torch.rand(out, generator=gen) + 0.5
    state = {
        f"unet.{ATTN}.lora_A.weight": a,
        f"unet.{ATTN}.lora_B.weight": b,
        f"unet.{ATTN}.lora_magnitude_vector": magnitude,
    }
    apply_file(hot, tmp_path, state, 1.0, "peft-dora")
    base = w0(before, ATTN)
    expected = _dora_expected(base, b.double() @ a.double(), magnitude, 1.0, per_row=True)
    # At strength 1 the weight IS the DoRA weight: each row's norm equals its magnitude.
    assert torch.allclose(expected.norm(dim=1), magnitude.double(), atol=1e-6)
    check(hot, before, {f"{ATTN}.weight": expected}, atol=5e-6)


def test_peft_alpha_from_diffusers_metadata(hot, tmp_path, gen):
    before = snapshot(hot)
    out, cin = weight(hot, ATTN).shape
    ff_out, ff_in = weight(hot, FF).shape
    r = 8
    tensors = {
        f"unet.{ATTN}.lora_A.weight": rand(r, cin, gen=gen),
        f"unet.{ATTN}.lora_B.weight": rand(out, r, gen=gen),
        f"unet.{FF}.lora_A.weight": rand(r, ff_in, gen=gen),
        f"unet.{FF}.lora_B.weight": rand(ff_out, r, gen=gen),
    }
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(
            {"unet.r": r, "unet.lora_alpha": 16, "unet.alpha_pattern": {"attn1.to_q": 4}}
        ),
    }
    apply_file(hot, tmp_path, tensors, 1.0, "peft-alpha", metadata)
    expected = {
        f"{ATTN}.weight": w0(before, ATTN)
        + (4 / r)
        * (tensors[f"unet.{ATTN}.lora_B.weight"].double() @ tensors[f"unet.{ATTN}.lora_A.weight"].double()),
        f"{FF}.weight": w0(before, FF)
        + (16 / r)
        * (tensors[f"unet.{FF}.lora_B.weight"].double() @ tensors[f"unet.{FF}.lora_A.weight"].double()),
    }
    check(hot, before, expected)


def test_kohya_lora_without_alpha_has_scale_one(hot, tmp_path, gen):
    before = snapshot(hot)
    out, cin = weight(hot, PROJ).shape[:2]
    down, up = rand(4, cin, 1, 1, gen=gen), rand(out, 4, 1, 1, gen=gen)
    apply_file(
        hot,
        tmp_path,
        {f"{flat(PROJ)}.lora_down.weight": down, f"{flat(PROJ)}.lora_up.weight": up},
        1.0,
        "no-alpha",
    )
    delta = (up.double().reshape(out, 4) @ down.double().reshape(4, cin)).reshape(out, cin, 1, 1)
    check(hot, before, {f"{PROJ}.weight": w0(before, PROJ) + delta})


# ---------------------------------------------------------------------------- SDXL, LDM names


@pytest.fixture(scope="module")
def hot_xl(template_home):
    model = ModelRegistry(Settings(home=template_home)).get(TINY_XL)
    return load_pipeline(model, torch.device("cpu"), torch.float32)


def _ldm_names_by_diffusers(unet) -> dict[str, str]:
    """diffusers name -> LDM name, using diffusers' own single-file converter as the oracle."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorafleet.worker.lora.module_index import ldm_block_prefixes, ldm_name

    prefixes = ldm_block_prefixes(dict(unet.config))
    ours = {}
    for module, m in unet.named_modules():
        for param, value in m.named_parameters(recurse=False):
            ours[f"model.diffusion_model.{ldm_name(module, prefixes)}.{param}"] = (
                f"{module}.{param}",
                torch.zeros(value.shape),
            )
    converted = convert_ldm_unet_checkpoint({k: v for k, (_, v) in ours.items()}, dict(unet.config))
    assert set(converted) == {name for name, _ in ours.values()}  # every LDM name lands where we say
    return {name: key for key, (name, _) in ours.items()}


def test_ldm_block_names_agree_with_diffusers_converter(hot_xl, hot):
    for pipeline in (hot_xl, hot):
        mapping = _ldm_names_by_diffusers(pipeline.patcher.components["unet"])
        assert len(mapping) > 50


def test_sdxl_kohya_file_with_ldm_block_names(hot_xl, tmp_path, gen):
    unet = hot_xl.patcher.components["unet"]
    before = snapshot(hot_xl)
    names = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
        "input_blocks_5_0_in_layers_2": "down_blocks.1.resnets.1.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_1_1_transformer_blocks_1_ff_net_2": "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2",
        "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "time_embed_0": "time_embedding.linear_1",
        "label_emb_0_0": "add_embedding.linear_1",
    }
    state, expected = {}, {}
    for ldm, module in names.items():
        shape = tuple(getattr(unet.get_submodule(module), "weight").shape)
        out, rest = shape[0], int(np.prod(shape[1:]))
        down, up = rand(2, *shape[1:], gen=gen), rand(out, 2, *([1] * (len(shape) - 2)), gen=gen)
        state[f"lora_unet_{ldm}.lora_down.weight"], state[f"lora_unet_{ldm}.lora_up.weight"] = down, up
        state[f"lora_unet_{ldm}.alpha"] = torch.tensor(1.0)
        expected[f"{module}.weight"] = before[f"unet:{module}.weight"].double().reshape(
            out, rest
        ) + 0.75 * 0.5 * up.double().reshape(out, 2) @ down.double().reshape(2, rest)
    info, lora = apply_file(hot_xl, tmp_path, state, 0.75, "sgm")
    assert info.family == "sdxl" and lora.unmatched == []
    check(hot_xl, before, expected)
