"""The patcher: merged weights equal an independent computation; restore is bit-exact."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.worker.lora.deltas import Delta
from lorafleet.worker.lora.formats import ParsedLora, parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher
from tests.worker.conftest import assert_same, snapshot


def parsed(hot, folder, name: str, fmt: str = "kohya") -> tuple[ParsedLora, dict[str, torch.Tensor]]:
    state = load_file(str(folder / f"{name}.safetensors"))
    return parse_lora(state, hot.patcher.index, fmt), state


def weight_of(hot, component: str, module: str) -> torch.Tensor:
    return hot.patcher.components[component].get_submodule(module).weight.detach()


def test_kohya_merge_equals_the_files_own_math(hot, template_home):
    folder = template_home / "autoimport" / "lora"
    lora, state = parsed(hot, folder, "watercolor")
    before = snapshot(hot)
    hot.patcher.apply([StackEntry(lora, 0.8, 0.5)])
    try:
        checked = 0
        for key in state:
            if not key.endswith(".lora_down.weight"):
                continue
            base = key[: -len(".lora_down.weight")]
            down, up = state[key].double(), state[f"{base}.lora_up.weight"].double()
            alpha = state[f"{base}.alpha"].double().item()
            component, prefix = (
                ("unet", "lora_unet_") if base.startswith("lora_unet_") else ("text_encoder", "lora_te_")
            )
            target = hot.patcher.index.lookup(base)
            assert target is not None and target.component == component, base
            strength = 0.8 if component == "unet" else 0.5
            w0 = before[f"{component}:{target.module}.weight"].double()
            expected = w0 + strength * alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).view_as(w0)
            torch.testing.assert_close(
                weight_of(hot, component, target.module).double(), expected, rtol=0, atol=1e-6
            )
            checked += 1
        assert checked == len(lora.deltas) > 0
    finally:
        hot.patcher.restore()
    assert_same(hot, before)


def test_peft_and_locon_merges_equal_the_files_own_math(hot, template_home):
    folder = template_home / "autoimport" / "lora"
    before = snapshot(hot)
    peft, peft_state = parsed(hot, folder, "ink-sketch", "peft")
    locon, locon_state = parsed(hot, folder, "texture-locon")
    assert any(len(d.target.shape) == 4 and d.target.shape[-1] == 3 for d in locon.deltas)
    hot.patcher.apply([StackEntry(peft, 0.7, 0.7), StackEntry(locon, -0.5, -0.5)])
    try:
        expected = {k: v.double() for k, v in before.items()}
        for key, a in peft_state.items():
            if key.endswith(".lora_A.weight"):
                module = key[len("unet.") : -len(".lora_A.weight")]
                b = peft_state[key.replace("lora_A", "lora_B")]
                w = expected[f"unet:{module}.weight"]
                w += 0.7 * (b.double() @ a.double()).view_as(w)
        for key, down in locon_state.items():
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                up, alpha = locon_state[f"{base}.lora_up.weight"], locon_state[f"{base}.alpha"].item()
                target = hot.patcher.index.lookup(base)
                w = expected[f"unet:{target.module}.weight"]
                w += (
                    -0.5
                    * alpha
                    / down.shape[0]
                    * (up.double().flatten(1) @ down.double().flatten(1)).view_as(w)
                )
        after = snapshot(hot)
        for key, value in expected.items():
            torch.testing.assert_close(after[key].double(), value, rtol=0, atol=1e-6, msg=key)
    finally:
        hot.patcher.restore()
    assert_same(hot, before)


def test_text_encoder_strength_is_separate(hot, template_home):
    lora, _ = parsed(hot, template_home / "autoimport" / "lora", "watercolor")
    before = snapshot(hot)
    hot.patcher.apply([StackEntry(lora, 1.0, 0.0)])
    try:
        after = snapshot(hot)
        te = [k for k in before if k.startswith("text_encoder:")]
        unet = [k for k in before if k.startswith("unet:")]
        assert all(torch.equal(before[k], after[k]) for k in te)
        assert any(not torch.equal(before[k], after[k]) for k in unet)
    finally:
        hot.patcher.restore()


def test_switching_stacks_touches_only_what_changes(hot, template_home):
    folder = template_home / "autoimport" / "lora"
    a, _ = parsed(hot, folder, "watercolor")
    b, _ = parsed(hot, folder, "ink-sketch", "peft")
    before = snapshot(hot)
    try:
        first = hot.patcher.apply([StackEntry(a, 1.0, 1.0)])
        assert first.written == len(a.deltas) and first.restored == 0
        again = hot.patcher.apply([StackEntry(a, 1.0, 1.0)])
        assert (again.written, again.restored) == (0, 0)  # identical stack costs nothing
        switch = hot.patcher.apply([StackEntry(b, 1.0, 1.0)])
        a_keys = {d.target.key for d in a.deltas}
        b_keys = {d.target.key for d in b.deltas}
        assert switch.restored == len(a_keys - b_keys)
        assert switch.written == len(b_keys)
        reweight = hot.patcher.apply([StackEntry(b, 0.5, 0.5)])
        assert reweight.written == len(b_keys) and reweight.restored == 0
    finally:
        hot.patcher.restore()
    assert_same(hot, before)


def test_random_stack_changes_stay_bit_exact(hot, template_home):
    folder = template_home / "autoimport" / "lora"
    loras = [
        parsed(hot, folder, "watercolor")[0],
        parsed(hot, folder, "ink-sketch", "peft")[0],
        parsed(hot, folder, "texture-locon")[0],
        parsed(hot, folder, "lcm-lora-sd15")[0],
    ]
    before = snapshot(hot)
    rng = random.Random(1)
    reference = {}
    for _ in range(60):
        picked = rng.sample(range(len(loras)), rng.randint(0, 3))
        weights = tuple(rng.choice([0.35, 0.45, 0.75, 1.0, -0.5]) for _ in picked)
        stack = [StackEntry(loras[i], w, w) for i, w in zip(picked, weights)]
        hot.patcher.apply(stack)
        state = snapshot(hot)
        key = (tuple(picked), weights)
        if key in reference:  # the same stack always gives the same bits, whatever came before
            assert all(torch.equal(reference[key][k], state[k]) for k in state)
        reference[key] = state
    hot.patcher.restore()
    assert_same(hot, before)


class ExplodingDelta(Delta):
    def add_to(self, weight, strength, original):
        raise RuntimeError("device lost half-way")


def test_an_exception_half_way_restores_the_pristine_weights(hot, template_home):
    good, _ = parsed(hot, template_home / "autoimport" / "lora", "watercolor")
    target = good.deltas[-1]
    bad = ParsedLora("kohya", [ExplodingDelta(target.target)])
    before = snapshot(hot)
    hot.patcher.apply([StackEntry(good, 1.0, 1.0)])
    with pytest.raises(RuntimeError, match="half-way"):
        hot.patcher.apply([StackEntry(good, 0.5, 0.5), StackEntry(bad, 1.0, 1.0)])
    assert hot.patcher.is_pristine
    assert_same(hot, before)


def test_parameters_are_written_in_place(hot, template_home):
    lora, _ = parsed(hot, template_home / "autoimport" / "lora", "watercolor")
    target = lora.deltas[0].target
    param = hot.patcher.components[target.component].get_submodule(target.module).weight
    identity, pointer = id(param), param.data_ptr()
    hot.patcher.apply([StackEntry(lora, 1.0, 1.0)])
    hot.patcher.restore()
    param_after = hot.patcher.components[target.component].get_submodule(target.module).weight
    assert id(param_after) == identity and param_after.data_ptr() == pointer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_rounded_once_and_restored_bit_exactly(template_home, dtype):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(template_home / "models" / "tiny-sd15" / "unet")).to(
        dtype
    )
    patcher = WeightPatcher({"unet": unet})
    folder = template_home / "autoimport" / "lora"
    a = parse_lora(load_file(str(folder / "texture-locon.safetensors")), patcher.index, "kohya")
    b = parse_lora(load_file(str(folder / "lcm-lora-sd15.safetensors")), patcher.index, "kohya")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    patcher.apply([StackEntry(a, 0.8, 0.8), StackEntry(b, 0.35, 0.35)])
    for delta in b.deltas:
        key = f"{delta.target.module}.weight"
        w0 = before[key].float().reshape(delta.target.shape[0], -1)
        expected = w0 + 0.35 * delta.scale * (delta.up @ delta.down)
        for other in a.deltas:
            if other.target == delta.target:
                expected += 0.8 * other.scale * (other.up @ other.down)
        got = unet.state_dict()[key].reshape(expected.shape)
        rounded = expected.to(dtype)
        ulp = (
            torch.nextafter(rounded, torch.full_like(rounded, float("inf"))).float() - rounded.float()
        ).abs()
        # Rounded once from the float32 sum: our sum and this one may differ in the last
        # float32 bits, which moves the rounding by at most one unit in the last place.
        assert ((got.float() - rounded.float()).abs() <= ulp).all()
    patcher.restore()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
