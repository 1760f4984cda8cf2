"""Format parsing: every key lands on its layer or is reported; bad tensors are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.worker.lora.formats import LoraFormatError, parse_lora


def state_of(folder, name):
    return load_file(str(folder / f"{name}.safetensors"))


def test_kohya_keys_map_to_unet_and_text_encoder_layers(hot, template_home):
    state = state_of(template_home / "autoimport" / "lora", "watercolor")
    # The demo file is named as files in the wild are (with CLIP's text_model level).
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    lora = parse_lora(state, hot.patcher.index, "kohya")
    components = {d.target.component for d in lora.deltas}
    assert components == {"unet", "text_encoder"} and lora.unmatched == []
    modules = {d.target.module for d in lora.deltas}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in modules
    assert any(m.endswith("encoder.layers.0.self_attn.q_proj") for m in modules)


def test_text_encoder_names_with_and_without_the_text_model_level_both_map(hot):
    index = hot.patcher.index
    with_level = index.lookup("lora_te_text_model_encoder_layers_1_mlp_fc1")
    without = index.lookup("lora_te_encoder_layers_1_mlp_fc1")
    dotted = index.lookup("text_encoder.text_model.encoder.layers.1.mlp.fc1")
    assert with_level is not None and with_level == without == dotted


def test_peft_keys_map_with_scale_one(hot, template_home):
    lora = parse_lora(
        state_of(template_home / "autoimport" / "lora", "ink-sketch"), hot.patcher.index, "peft"
    )
    assert {d.scale for d in lora.deltas} == {1.0}
    assert any(d.target.module.endswith("ff.net.2") for d in lora.deltas)


def test_older_diffusers_processor_names_map_too(hot):
    index = hot.patcher.index
    target = index.lookup("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    assert target is not None
    rank = 2
    state = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.randn(
            rank, target.shape[1]
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.randn(
            target.shape[0], rank
        ),
    }
    lora = parse_lora(state, index, "diffusers-old")
    assert [d.target.key for d in lora.deltas] == [target.key]


def test_keys_matching_no_layer_are_reported_not_dropped(hot, template_home):
    state = state_of(template_home / "autoimport" / "lora", "watercolor")
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(32, 4)
    state["something_else_entirely"] = torch.zeros(1)
    lora = parse_lora(state, hot.patcher.index, "kohya")
    assert "something_else_entirely" in lora.unmatched
    assert "lora_unet_no_such_block_to_q.down" in lora.unmatched


def test_a_file_matching_nothing_is_an_error(hot):
    with pytest.raises(LoraFormatError, match="no key .* matches a layer"):
        parse_lora({"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1)}, hot.patcher.index, "kohya")


def test_wrong_shapes_are_refused(hot):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{key}.lora_down.weight": torch.zeros(4, 999), f"{key}.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="the layer.s weight is"):
        parse_lora(state, hot.patcher.index, "kohya")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(hot, bad):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down = torch.zeros(4, 32)
    down[0, 0] = bad
    state = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="NaN or infinite"):
        parse_lora(state, hot.patcher.index, "kohya")


def test_missing_factor_is_refused(hot):
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(LoraFormatError, match=r"tensors \[.down.\] make no known LoRA layer"):
        parse_lora({f"{key}.lora_down.weight": torch.zeros(4, 32)}, hot.patcher.index, "kohya")
