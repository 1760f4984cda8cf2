"""The IP-Adapter drop folder: a folder is described once, and described again when its
weights are rewritten or a file is added beside them (a second weights file is refused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorafleet.common.catalog.ip_adapters import ENCODER, IpAdapterCatalog, IpAdapterError
from lorafleet.common.catalog.lora_files import sha256_file
from tests.common.test_drop_folder import write_tensors

SHAPES = {"image_proj.proj.weight": [8, 4], "ip_adapter.1.to_k_ip.weight": [4, 8]}


def write_ip_adapter(folder: Path, fill: float) -> Path:
    """A tiny IP-Adapter folder (header-valid weights, every value ``fill``, and an encoder config)."""
    write_tensors(folder / "ip-adapter.safetensors", SHAPES, fill)
    (folder / ENCODER).mkdir(exist_ok=True)
    (folder / ENCODER / "config.json").write_text("{}")
    return folder / "ip-adapter.safetensors"


def later(path: Path) -> None:
    """Move ``path``'s mtime a second on, as a change seen after the clock's tick does."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_an_ip_adapter_is_described_once_until_its_weights_are_rewritten(tmp_path):
    weights = write_ip_adapter(tmp_path / "face", 0.0)
    catalog = IpAdapterCatalog(tmp_path)
    first = catalog.get("face")
    assert catalog.get("face") is first and first.cross_attention_dim == 8
    write_tensors(weights, SHAPES, 1.0)  # the same size, other bytes
    later(weights)
    again = catalog.get("face")
    assert again.sha256 == sha256_file(weights) != first.sha256


def test_a_second_weights_file_dropped_beside_them_is_noticed_and_refused(tmp_path):
    folder = tmp_path / "face"
    write_ip_adapter(folder, 0.0)
    catalog = IpAdapterCatalog(tmp_path)
    catalog.get("face")
    write_tensors(folder / "ip-adapter-plus.safetensors", SHAPES, 2.0)
    later(folder)
    with pytest.raises(IpAdapterError, match="2 IP-Adapter weights files in it"):
        catalog.get("face")


def test_an_ip_adapter_folder_removed_is_unknown(tmp_path):
    weights = write_ip_adapter(tmp_path / "face", 0.0)
    catalog = IpAdapterCatalog(tmp_path)
    catalog.get("face")
    weights.unlink()
    (tmp_path / "face" / ENCODER / "config.json").unlink()
    (tmp_path / "face" / ENCODER).rmdir()
    (tmp_path / "face").rmdir()
    with pytest.raises(IpAdapterError, match="unknown IP-Adapter 'face'"):
        catalog.get("face")
