"""The LoRA drop folder, read without torch: names, checks, families, hostile headers.

One lookup (``LoraCatalog.get``) returns a description or raises LoraError."""

from __future__ import annotations

import json
import struct

import pytest

from lorafleet.common.catalog.lora_files import describe_file, read_safetensors_header
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.schema.errors import FileRefused, LoraError
from lorafleet.common.schema.family import Family


def write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_file_copied_into_the_folder_is_usable_by_its_name_without_a_restart(home):
    catalog = LoraCatalog(home / "autoimport" / "lora")
    assert "watercolor" in catalog.names()
    assert catalog.get("watercolor").name == "watercolor"
    assert catalog.get("watercolor.safetensors").name == "watercolor"
    (home / "autoimport" / "lora" / "fresh.safetensors").write_bytes(
        (home / "autoimport" / "lora" / "watercolor.safetensors").read_bytes()
    )
    assert catalog.get("fresh").sha256 == catalog.get("watercolor").sha256


def test_demo_files_are_described_from_their_headers(home):
    catalog = LoraCatalog(home / "autoimport" / "lora")
    watercolor = catalog.get("watercolor")
    assert (watercolor.format, watercolor.family, watercolor.rank) == ("kohya-lora", "sd15", 4)
    assert watercolor.trigger_words == ["watercolor"]
    assert len(watercolor.sha256) == 64 and watercolor.short_hash == watercolor.sha256[:12]
    peft = catalog.get("ink-sketch")
    assert (peft.format, peft.rank) == ("peft", 8)
    assert peft.cross_attention_width == 32  # the tiny model's text embedding width
    lcm = catalog.get("lcm-lora-sd15")
    assert lcm.is_lcm and lcm.rank is not None and lcm.rank <= 64
    assert not watercolor.is_lcm


def test_sdxl_files_are_told_apart(home):
    catalog = LoraCatalog(home / "xl-loras")
    assert catalog.get("watercolor").family is Family.sdxl
    assert catalog.get("ink-sketch").cross_attention_width == 80  # the tiny SDXL: 32 + 48 wide encoders


def test_unknown_name_lists_what_is_there(home):
    with pytest.raises(LoraError) as caught:
        LoraCatalog(home / "autoimport" / "lora").get("nope")
    assert "unknown LoRA 'nope'" in str(caught.value) and "watercolor" in str(caught.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickled_files_are_refused_saying_why(home, suffix):
    folder = home / "autoimport" / "lora"
    (folder / f"evil{suffix}").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoraError, match="pickled .* arbitrary code"):
        LoraCatalog(folder).get("evil")
    with pytest.raises(FileRefused, match="arbitrary code"):
        describe_file(folder / f"evil{suffix}")


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit the file"),
        (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FileRefused, match=words):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}, "dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}, "outside the file"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "8 bytes for shape"),
    ],
)
def test_inconsistent_tensor_entries_are_refused(tmp_path, entry, words):
    path = tmp_path / "bad.safetensors"
    write_raw(path, {"lora_unet_x.lora_down.weight": entry}, b"\x00" * 8)
    with pytest.raises(FileRefused, match=words):
        read_safetensors_header(path)


def test_corrupt_file_in_the_folder_is_refused_at_resolve(home):
    folder = home / "autoimport" / "lora"
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LoraError, match="LoRA 'broken' is refused"):
        LoraCatalog(folder).get("broken")


def test_path_like_names_never_leave_the_folder(home):
    catalog = LoraCatalog(home / "autoimport" / "lora")
    for name in ("../models/tiny-sd15", "/etc/passwd", ".hidden", "a\\b"):
        assert catalog.path_of(name) is None


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    from lorafleet.common.catalog.lora_files import MAX_LORA_BYTES

    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:  # sparse: no disk is used
        f.truncate(MAX_LORA_BYTES + 1)
    with pytest.raises(FileRefused, match="over the 4 GiB limit"):
        describe_file(huge)
    with pytest.raises(LoraError, match="over the 4 GiB limit"):
        LoraCatalog(tmp_path).get("huge")


def test_broken_files_in_the_folder_are_reported_not_skipped(home):
    folder = home / "autoimport" / "lora"
    (folder / "lcm-broken.safetensors").write_bytes(b"\xff" * 64)
    usable, broken = LoraCatalog(folder).lcm_loras(Family.sd15)
    assert [i.name for i in usable] == ["lcm-lora-sd15"]
    assert [(b.name, b.path.name) for b in broken] == [("lcm-broken", "lcm-broken.safetensors")]
    assert "header length" in broken[0].problem


def test_a_header_that_nests_too_deeply_is_refused_not_a_crash(tmp_path):
    path = tmp_path / "deep.safetensors"
    write_raw_bytes = b"[" * 200_000
    path.write_bytes(struct.pack("<Q", len(write_raw_bytes)) + write_raw_bytes)
    with pytest.raises(FileRefused, match="nests too deeply"):
        describe_file(path)


def test_a_factor_of_rank_zero_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "rank0.safetensors"
    write_raw(
        path,
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": {
                "dtype": "F32",
                "shape": [0, 32],
                "data_offsets": [0, 0],
            },
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": {
                "dtype": "F32",
                "shape": [32, 0],
                "data_offsets": [0, 0],
            },
        },
    )
    with pytest.raises(FileRefused, match="rank 0"):
        describe_file(path)
