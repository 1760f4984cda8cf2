"""Side paths: every row of one UNet call runs its own LoRA stack, and the weights stay put."""

from __future__ import annotations

import re

import pytest
import torch

from lorafleet.worker.lora.deltas import (
    DoraDelta,
    FullDelta,
    HadamardDelta,
    KroneckerDelta,
    LowRankDelta,
    RowsDelta,
    TuckerDelta,
)
from lorafleet.worker.lora.formats import ParsedLora
from lorafleet.worker.lora.patcher import StackEntry
from lorafleet.worker.lora.side_paths import (
    NoSidePath,
    SidePaths,
    for_cfg,
    side_path_ok,
    side_stack,
    stack_rank,
)
from tests.worker.conftest import assert_same, snapshot
from tests.worker.test_patcher import parsed

TO_Q = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def loras(hot, template_home):
    folder = template_home / "autoimport" / "lora"
    return {
        "watercolor": parsed(hot, folder, "watercolor")[0],
        "ink": parsed(hot, folder, "ink-sketch", "peft")[0],
        "locon": parsed(hot, folder, "texture-locon")[0],
        "lcm": parsed(hot, folder, "lcm-lora-sd15")[0],
    }


def unet_of(hot) -> dict[str, torch.nn.Module]:
    return {"unet": hot.pipe.unet}


def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet inputs for ``rows`` rows: latents, timesteps, text embeddings (width 32)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 4, 8, 8, generator=gen),
        torch.tensor([500] * rows),
        torch.randn(rows, 77, 32, generator=gen),
    )


@torch.no_grad()
def unet_call(hot, paths: SidePaths | None, latents, steps, text) -> torch.Tensor:
    if paths is None:
        return hot.pipe.unet(latents, steps, text).sample
    with paths.attached():
        return hot.pipe.unet(latents, steps, text).sample


def rows_of(*parts):
    """One batch made of rows taken from several input sets: (inputs, row) pairs."""
    return tuple(torch.stack([given[i][row] for given, row in parts]) for i in range(3))


def test_one_row_equals_the_same_stack_merged_and_writes_no_weight(hot, loras):
    stack = [(loras["watercolor"], 1.5), (loras["locon"], -2.0), (loras["lcm"], 0.75)]
    latents, steps, text = inputs(1, seed=1)
    base = unet_call(hot, None, latents, steps, text)
    before = snapshot(hot)
    side = unet_call(hot, SidePaths.build(unet_of(hot), [stack]), latents, steps, text)
    assert_same(hot, before)
    hot.patcher.apply([StackEntry(lora, strength, 0.0) for lora, strength in stack])
    try:
        merged = unet_call(hot, None, latents, steps, text)
    finally:
        hot.patcher.restore()
    assert_same(hot, before)
    scale = merged.abs().max()
    assert (merged - base).abs().max() > 1e-2 * scale  # the stack does change the output
    assert (side - merged).abs().max() < 1e-5 * scale


def test_a_rows_output_is_bit_exact_whatever_the_other_rows_carry(hot, loras):
    mine = [(loras["locon"], 1.5), (loras["ink"], 0.8)]  # convolutions and linears
    first, second = inputs(4, seed=2), inputs(4, seed=3)
    unet = unet_of(hot)
    one = SidePaths.build(unet, [mine, [(loras["lcm"], 1.0)], [(loras["watercolor"], -1.0)], []])
    other = SidePaths.build(
        unet, [mine, [], [(loras["lcm"], 0.3), (loras["ink"], 2.0)], [(loras["locon"], 1.0)]]
    )
    # row 0 has the same input in both calls; the other rows differ in inputs and stacks
    a = unet_call(hot, one, *rows_of((first, 0), (first, 1), (first, 2), (first, 3)))
    b = unet_call(hot, other, *rows_of((first, 0), (second, 1), (second, 2), (second, 3)))
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1:], b[1:])


def test_a_mixed_call_gives_each_row_the_bits_of_a_call_of_its_stack_alone(hot, loras):
    s = [(loras["locon"], 1.2), (loras["watercolor"], 0.6)]
    t = [(loras["lcm"], 0.9)]
    given = inputs(2, seed=4)
    unet = unet_of(hot)
    mixed = unet_call(hot, SidePaths.build(unet, [s, t]), *given)
    only_s = unet_call(hot, SidePaths.build(unet, [s, s]), *given)
    only_t = unet_call(hot, SidePaths.build(unet, [t, t]), *given)
    # same rows and budget: the same bits (the guarantee)
    assert torch.equal(mixed[0], only_s[0]) and torch.equal(mixed[1], only_t[1])
    # a one-row call has other shapes: the same values up to float rounding only
    alone = unet_call(hot, SidePaths.build(unet, [t]), *rows_of((given, 1)))
    assert (alone[0] - mixed[1]).abs().max() < 1e-5 * mixed.abs().max()


def test_an_empty_stack_row_gives_the_base_models_bits(hot, loras):
    given = inputs(2, seed=5)
    base = unet_call(hot, None, *given)
    side = unet_call(hot, SidePaths.build(unet_of(hot), [[(loras["lcm"], 1.0)], []]), *given)
    assert torch.equal(side[1], base[1]) and not torch.equal(side[0], base[0])


def test_rows_sharing_a_stack_share_its_factors_and_untouched_layers_get_no_hook(hot, loras):
    stack = [(loras["watercolor"], 1.0)]
    paths = SidePaths.build(unet_of(hot), [stack, stack, []], rank_budget=8)
    expected = {f"{d.target.component}:{d.target.module}" for d in loras["watercolor"].deltas}
    assert set(paths.layers) == {k for k in expected if k.startswith("unet:")}
    layer = paths.layers[TO_Q.removesuffix(".weight")]
    assert layer.down.shape[:2] == (3, 8) and layer.up.shape[0] == 3 and layer.up.shape[2] == 8
    assert torch.equal(layer.down[0], layer.down[1]) and not layer.down[2].any()
    assert not layer.down[0, 4:].any()  # rank 4, zero-padded to 8


def test_a_fused_layers_low_rank_rows_take_the_up_factors_rows(hot):
    target = hot.patcher.index.targets[TO_Q]
    out, width = target.shape
    gen = torch.Generator().manual_seed(6)
    whole = LowRankDelta(
        target, torch.randn(2 * out, 3, generator=gen), torch.randn(3, width, generator=gen), 0.5
    )
    rows = torch.arange(out, 2 * out)
    piece = RowsDelta(target, inner=whole, rows=rows)
    plain = LowRankDelta(target, whole.up[rows], whole.down, 0.5)
    given = inputs(1, seed=7)
    unet = unet_of(hot)
    fused = unet_call(hot, SidePaths.build(unet, [[([piece], 1.0)]]), *given)
    assert torch.equal(fused, unet_call(hot, SidePaths.build(unet, [[([plain], 1.0)]]), *given))
    assert side_path_ok(ParsedLora("flux", [piece])) is None


def _refused_deltas(hot) -> dict[str, object]:
    target = hot.patcher.index.targets[TO_Q]
    out, width = target.shape
    low = LowRankDelta(target, torch.randn(out, 2), torch.randn(2, width))
    return {
        "LoHa": HadamardDelta(
            target, torch.randn(out, 2), torch.randn(2, width), torch.randn(out, 2), torch.randn(2, width)
        ),
        "LoKr": KroneckerDelta(target, w1=torch.randn(2, 2), w2=torch.randn(out // 2, width // 2)),
        "full weight difference": FullDelta(target, torch.randn(out, width)),
        "DoRA": DoraDelta(target, inner=low, c=torch.ones(out)),
        "Tucker": TuckerDelta(target, torch.randn(out, 2), torch.randn(2, 2, 1, 1), torch.randn(2, width)),
        "rows (RowsDelta) of a LoKr": RowsDelta(
            target,
            inner=KroneckerDelta(target, w1=torch.randn(2, 2), w2=torch.randn(out // 2, width // 2)),
            rows=torch.arange(out),
        ),
    }


def test_loha_lokr_full_dora_and_tucker_deltas_are_refused_by_kind(hot, loras):
    for kind, delta in _refused_deltas(hot).items():
        lora = ParsedLora("lycoris", [delta])
        reason = side_path_ok(lora)
        assert reason is not None and kind in reason and "lycoris" in reason and "merged" in reason
        with pytest.raises(NoSidePath, match=re.escape(kind)):
            SidePaths.build(unet_of(hot), [[(loras["ink"], 1.0)], [(lora, 1.0)]])
    for lora in loras.values():
        assert side_path_ok(lora) is None


def test_text_encoder_deltas_are_left_to_the_caller(hot, loras):
    watercolor = loras["watercolor"]
    assert any(d.target.is_text_encoder for d in watercolor.deltas)
    paths = SidePaths.build(unet_of(hot), [side_stack([StackEntry(watercolor, 1.0, 0.5)])])
    assert paths.layers and all(key.startswith("unet:") for key in paths.layers)
    with pytest.raises(ValueError, match="text_encoder"):
        SidePaths.build(hot.patcher.components, [[(watercolor, 1.0)]])
    with pytest.raises(ValueError, match="row 0.s stack must be a list of"):  # one stack given for the rows
        SidePaths.build(unet_of(hot), side_stack([StackEntry(watercolor, 1.0, 0.5)]))


def test_a_stack_over_the_rank_budget_is_refused_naming_budget_and_rank(hot, loras):
    stack = [(loras["lcm"], 1.0), (loras["ink"], 1.0)]
    rank = stack_rank(stack, unet_of(hot))
    assert rank > 64
    with pytest.raises(NoSidePath, match=rf"rank {rank} .* rank budget of 64"):
        SidePaths.build(unet_of(hot), [[], stack], rank_budget=64)
    assert SidePaths.build(unet_of(hot), [[], stack], rank_budget=rank).rank_budget == rank


def test_a_batch_other_than_the_plans_rows_raises_and_the_hooks_go_with_the_context(hot, loras):
    paths = SidePaths.build(unet_of(hot), [[(loras["locon"], 1.0)]] * 2)
    given = inputs(3, seed=8)
    base = unet_call(hot, None, *given)
    with pytest.raises(ValueError, match="a batch of 3 rows: the plan has 2"):
        unet_call(hot, paths, *given)
    assert not any(layer.module._forward_hooks for layer in paths.layers.values())
    assert torch.equal(unet_call(hot, None, *given), base)
    with paths.attached(), pytest.raises(ValueError, match="already attached"):
        with paths.attached():
            pass
    assert not any(layer.module._forward_hooks for layer in paths.layers.values())


def test_the_pipeline_samples_mixed_stacks_with_cfg(hot, loras):
    """Two images, [S, none], guided: the side-path image 0 is the merged S image; image 1
    is the plain model's, bit for bit; and image 0 does not see what image 1 carries."""
    stack = [(loras["locon"], 1.5), (loras["lcm"], 0.5)]

    def sample(stacks=None) -> torch.Tensor:
        call = dict(
            prompt=["a lighthouse at night", "a red sea"],
            num_inference_steps=3,
            guidance_scale=7.5,
            width=64,
            height=64,
            output_type="pt",
            generator=[torch.Generator().manual_seed(seed) for seed in (11, 12)],
        )
        if stacks is None:
            return hot.pipe(**call).images
        with SidePaths.build(unet_of(hot), for_cfg(stacks)).attached():
            return hot.pipe(**call).images

    before = snapshot(hot)
    mixed = sample([stack, []])
    other = sample([stack, [(loras["watercolor"], 2.0)]])
    plain = sample()
    hot.patcher.apply([StackEntry(lora, strength, 0.0) for lora, strength in stack])
    try:
        merged = sample()
    finally:
        hot.patcher.restore()
    assert_same(hot, before)
    assert torch.equal(mixed[1], plain[1])
    assert torch.equal(mixed[0], other[0]) and not torch.equal(mixed[1], other[1])
    assert (mixed[0] - plain[0]).abs().max() > 1e-3
    assert (mixed[0] - merged[0]).abs().max() < 1e-4
    assert for_cfg([stack, []]) == [stack, [], stack, []]


def test_a_plan_serves_a_call_that_doubles_its_rows_for_guidance(hot, loras):
    """diffusers' CFG lays a call out as [uncond; cond]: the plan of the images' stacks serves
    it as the plan of the stacks doubled does, bit for bit."""
    stacks = [[(loras["locon"], 0.7)], []]
    given = inputs(4, seed=11)
    doubled = unet_call(hot, SidePaths.build(unet_of(hot), for_cfg(stacks)), *given)
    assert torch.equal(unet_call(hot, SidePaths.build(unet_of(hot), stacks), *given), doubled)


def test_an_fp8_layer_gets_factors_in_its_compute_dtype_and_runs():
    """An fp8 checkpoint's Linear keeps its weight in e4m3 and computes in its bias's dtype
    (worker/flow_checkpoints.py): its side path must too (e4m3 factors cannot multiply)."""
    from lorafleet.worker.flow_checkpoints import FP8, upcast_per_layer
    from lorafleet.worker.lora.module_index import Target

    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    model[0].weight.data = model[0].weight.data.to(FP8)
    assert upcast_per_layer(model, torch.bfloat16) == 1
    target = Target("transformer", "0", "weight", (8, 16))
    delta = LowRankDelta(target, torch.randn(8, 4), torch.randn(4, 16), 0.5)
    paths = SidePaths.build({"transformer": model}, [[([delta], 1.0)], []])
    assert paths.layers["transformer:0"].down.dtype == torch.bfloat16
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    with paths.attached():
        out = model(x)
    assert torch.equal(out[1], model(x)[1])  # the row without a stack: the plain layer
    assert not torch.equal(out[0], model(x)[0])


def test_a_layer_that_sees_every_images_tokens_in_one_sequence_has_no_side_path():
    from lorafleet.worker.lora.module_index import Target
    from lorafleet.worker.lora.side_paths import check_stack

    class ZImageTransformer2DModel(torch.nn.Module):  # the class name is what tells
        def __init__(self):
            super().__init__()
            self.all_x_embedder = torch.nn.ModuleDict({"2-1": torch.nn.Linear(16, 8)})

    model = ZImageTransformer2DModel()
    target = Target("transformer", "all_x_embedder.2-1", "weight", (8, 16))
    delta = LowRankDelta(target, torch.randn(8, 4), torch.randn(4, 16), 1.0)
    with pytest.raises(NoSidePath, match="every image's tokens in one sequence"):
        check_stack([([delta], 1.0)], {"transformer": model})
