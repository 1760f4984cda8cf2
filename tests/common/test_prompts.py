"""A1111's prompt syntax read as text: attention weights, BREAK, LoRA tags; sampler names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.common.schema import samplers
from lorafleet.common.schema.prompts import (
    BREAK,
    Fragment,
    format_number,
    is_plain,
    lora_tag,
    parse_attention,
    split_lora_tags,
)
from lorafleet.common.schema.samplers import Sampler


def weights(prompt: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 6)) for f in parse_attention(prompt) if not f.is_break]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.21)]),
        ("[cat]", [("cat", round(1 / 1.1, 6))]),
        ("(cat:1.3) dog", [("cat", 1.3), (" dog", 1.0)]),
        ("(a (cat:2):0.5)", [("a ", 0.5), ("cat", 1.0)]),
        ("(unclosed cat", [("unclosed cat", 1.1)]),
        (r"\(cat\) \[x\] a\\b", [("(cat) [x] a\\b", 1.0)]),
        ("cat)", [("cat)", 1.0)]),
        ("a \\ b \\", [("a  b ", 1.0)]),
        ("time: 5, (cat: 1.5 )", [("time: 5, ", 1.0), ("cat", 1.5)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_weights_follow_a1111(prompt, expected):
    assert weights(prompt) == expected


def test_break_splits_and_only_the_upper_case_word():
    parts = parse_attention("a cat BREAK (dog) breakfast")
    assert parts == [Fragment("a cat", 1.0), BREAK, Fragment("dog", 1.1), Fragment(" breakfast", 1.0)]
    assert not any(f.is_break for f in parse_attention("a Break in the clouds, breakBREAKx"))


@given(st.text(alphabet="abc ,.:!?-'0123456789", max_size=60))
def test_text_without_brackets_is_plain(text):
    assert is_plain(text) == ("BREAK" not in text)


def test_weighted_escaped_or_broken_prompts_are_not_plain():
    for prompt in ("(cat:1.0)", r"\(cat\)", "a BREAK b", "[cat]"):
        assert not is_plain(prompt)


@pytest.mark.parametrize(
    "tag, weight, te",
    [
        ("<lora:x>", None, None),
        ("<lora:x:0.8>", 0.8, None),
        ("<lora:x:0.2:0.9>", 0.9, 0.2),
        ("<lora:x:1:1>", 1.0, None),
        ("<lora:x:te=0.3>", 0.3, None),
        ("<lora:x:0.5:unet=1.5>", 1.5, 0.5),
        ("<lyco:x:0.7>", 0.7, None),
        ("<LORA:x:-0.5>", -0.5, None),
    ],
)
def test_lora_tag_forms(tag, weight, te):
    text, tags = split_lora_tags(f"a {tag} cat")
    assert text == "a cat"
    assert [(t.name, t.weight, t.text_encoder_weight) for t in tags] == [("x", weight, te)]


def test_written_tags_read_back_as_the_same_weights():
    for weight, te in [(0.75, None), (0.1 + 0.2, None), (1.0, 0.25), (-1.5, 2.0)]:
        _, [tag] = split_lora_tags(lora_tag("name with spaces", weight, te))
        assert (tag.name, tag.weight, tag.text_encoder_weight) == ("name with spaces", weight, te)


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
def test_format_number_round_trips(value):
    assert float(format_number(value)) == value


@pytest.mark.parametrize(
    "name, schedule, sampler",
    [
        ("DPM++ 2M", "Karras", Sampler.dpmpp_2m_karras),
        ("DPM++ 2M Karras", None, Sampler.dpmpp_2m_karras),
        ("DPM++ 2M SDE Karras", "", Sampler.dpmpp_2m_sde_karras),
        ("DPM++ SDE", "Karras", Sampler.dpmpp_sde_karras),
        ("Euler", "SGM Uniform", Sampler.euler_trailing),
        ("Euler", "Automatic", Sampler.euler),
        ("LCM", "SGM Uniform", Sampler.lcm_trailing),
        ("Euler a", None, Sampler.euler_a),
        ("UniPC", None, Sampler.unipc),
        ("TCD", None, Sampler.tcd),
    ],
)
def test_a1111_sampler_names(name, schedule, sampler):
    assert samplers.from_a1111(name, schedule) is sampler


def test_every_sampler_reads_back_from_what_is_written():
    for sampler in Sampler:
        fields = dict(samplers.a1111_fields(sampler))
        assert samplers.from_a1111(fields["Sampler"], fields.get("Schedule type")) is sampler
        assert samplers.from_alias(sampler.value) is sampler


def test_an_unknown_sampler_or_schedule_names_what_is_allowed():
    with pytest.raises(ValueError, match="allowed: lcm"):
        samplers.from_alias("PLMS")
    with pytest.raises(ValueError, match="schedule type 'Exponential'"):
        samplers.from_a1111("DPM++ 2M", "Exponential")


def test_a1111_automatic_schedule_means_karras_for_the_dpmpp_samplers_it_defaults_so():
    assert samplers.from_a1111("DPM++ 2M", "Automatic") is Sampler.dpmpp_2m_karras
    assert samplers.from_a1111("DPM++ SDE", "Automatic") is Sampler.dpmpp_sde_karras
    assert samplers.from_a1111("DPM++ 2M", None) is Sampler.dpmpp_2m  # before 1.9: no schedule field
    assert samplers.from_a1111("DPM++ 2M", "Uniform") is Sampler.dpmpp_2m
    assert dict(samplers.a1111_fields(Sampler.dpmpp_2m))["Schedule type"] == "Uniform"


def test_a_tag_naming_only_the_unet_weight_keeps_a1111s_text_encoder_weight_of_one():
    _, [tag] = split_lora_tags("<lora:x:unet=0.5>")
    assert (tag.weight, tag.text_encoder_weight) == (0.5, 1.0)


def test_other_extra_network_tags_are_taken_out_as_a1111_does():
    text, tags = split_lora_tags("a <wildcard:colour> cat <lora:x:1>")
    assert text == "a cat" and [t.name for t in tags] == ["x"]


@pytest.mark.parametrize("name", ["a:b", "a>b", "a<b"])
def test_lora_names_that_a_tag_cannot_spell_are_refused(name):
    from lorafleet.common.schema.jobs import check_lora_name

    with pytest.raises(ValueError, match="':', '<' or '>'"):
        check_lora_name(name)
