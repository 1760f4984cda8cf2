"""The drop folders of LoRAs, embeddings and VAEs, against a real Redis and a store: one order
(local file, registered entry, pickled refusal, unknown) and one wording for all three."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import pytest
import redis

from lorafleet.common.catalog.drop_folder import NAMES_LISTED, DropFolder
from lorafleet.common.catalog.embeddings import EmbeddingCatalog
from lorafleet.common.catalog.lora_files import describe_file, sha256_file
from lorafleet.common.catalog.loras import LoraCatalog
from lorafleet.common.catalog.shared_files import LoraRegistry, SharedFiles, object_key
from lorafleet.common.catalog.vaes import DIFFUSERS_VAE_WEIGHTS, VaeCatalog
from lorafleet.common.infra.storage import LocalStorage


def write_tensors(path: Path, shapes: dict[str, list[int]], fill: float) -> None:
    """A safetensors file of F32 tensors, every value ``fill``."""
    header, data = {}, b""
    for key, shape in shapes.items():
        raw = struct.pack(f"<{prod(shape)}f", *[fill] * prod(shape))
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@dataclass
class Kind:
    """One kind of drop folder, and how a test makes its files and registers them."""

    catalog: Callable[[Path, redis.Redis | None], DropFolder]
    write: Callable[[Path, int], None]
    """Write a usable file of this kind; another ``variant`` gives other bytes."""
    publish: Callable[[redis.Redis, str, Path, LocalStorage], None]


def _lora_kind(home: Path) -> Kind:
    demos = [home / "autoimport" / "lora" / f"{name}.safetensors" for name in ("watercolor", "ink-sketch")]

    def publish(client: redis.Redis, name: str, path: Path, store: LocalStorage) -> None:
        LoraRegistry(client).publish_lora(describe_file(path, name), store)

    return Kind(
        catalog=lambda folder, client: LoraCatalog(folder, LoraRegistry(client) if client else None),
        write=lambda path, variant: _copy(demos[variant], path),
        publish=publish,
    )


def _shared_kind(kind: str, catalog: type[DropFolder], shapes: dict[str, list[int]], meta: dict) -> Kind:
    def publish(client: redis.Redis, name: str, path: Path, store: LocalStorage) -> None:
        SharedFiles(client, kind).publish(name, path, sha256_file(path), meta, store)

    return Kind(
        catalog=lambda folder, client: catalog(folder, SharedFiles(client, kind) if client else None),
        write=lambda path, variant: write_tensors(path, shapes, float(variant)),
        publish=publish,
    )


def _copy(source: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)


@pytest.fixture(params=["lora", "embedding", "vae"])
def kind(request, home) -> Kind:
    if request.param == "lora":
        return _lora_kind(home)
    if request.param == "embedding":
        return _shared_kind(
            "embedding",
            EmbeddingCatalog,
            {"emb_params": [2, 8]},
            {"vectors": 2, "widths": {"text_encoder": 8}},
        )
    return _shared_kind("vae", VaeCatalog, {"decoder.conv_out.weight": [3, 4, 1, 1]}, {})


@pytest.fixture
def client(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def store(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "autoimport"
    path.mkdir()
    return path


def register(kind: Kind, client, store, tmp_path, name: str, variant: int = 0) -> Path:
    """Register ``name`` for the fleet from a file outside the folder; its path."""
    source = tmp_path / "elsewhere" / f"{name}.safetensors"
    kind.write(source, variant)
    kind.publish(client, name, source, store)
    return source


def test_names_are_the_folders_files_and_every_registered_name(kind, client, store, folder, tmp_path):
    kind.write(folder / "local-one.safetensors", 0)
    register(kind, client, store, tmp_path, "shared-one")
    catalog = kind.catalog(folder, client)
    assert catalog.names() == ["local-one", "shared-one"]
    assert catalog.local_names() == ["local-one"] and catalog.registered_names() == ["shared-one"]
    assert kind.catalog(folder, None).names() == ["local-one"]
    shared = catalog.get("shared-one")
    assert shared.path is None and shared.object_key.endswith(f"{shared.sha256}.safetensors")


def test_a_local_file_wins_over_the_registered_entry_of_its_name(kind, client, store, folder, tmp_path):
    source = register(kind, client, store, tmp_path, "same", variant=0)
    kind.write(folder / "same.safetensors", 1)
    catalog = kind.catalog(folder, client)
    local = catalog.get("same")
    assert local.path is not None and local.object_key is None
    assert local.sha256 == sha256_file(folder / "same.safetensors") != sha256_file(source)
    (folder / "same.safetensors").unlink()
    assert catalog.get("same").sha256 == sha256_file(source) and catalog.get("same").path is None


def test_a_file_is_described_once_until_it_is_rewritten_in_place(kind, folder):
    path = folder / "style.safetensors"
    kind.write(path, 0)
    catalog = kind.catalog(folder, None)
    first = catalog.get("style")
    assert catalog.get("style") is first  # same size and mtime: the cached description
    kind.write(path, 1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = catalog.get("style")
    assert again.sha256 == sha256_file(path) != first.sha256


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_a_pickled_file_is_refused_saying_why(kind, client, folder, suffix):
    (folder / f"old{suffix}").write_bytes(b"\x80\x04pickle")
    catalog = kind.catalog(folder, client)
    with pytest.raises(catalog.error, match=rf"old\{suffix} is a pickled .* arbitrary code") as caught:
        catalog.get("old")
    assert caught.value.allowed == f"a .safetensors {catalog.noun}"


def test_an_unknown_name_is_refused_listing_the_known_ones_and_where_they_come_from(
    kind, client, store, folder, tmp_path
):
    kind.write(folder / "local-one.safetensors", 0)
    register(kind, client, store, tmp_path, "shared-one")
    catalog = kind.catalog(folder, client)
    with pytest.raises(catalog.error) as caught:
        catalog.get("nope")
    message = str(caught.value)
    assert message.startswith(f"unknown {catalog.noun} 'nope' (allowed: ")
    assert str(folder) in message and catalog.import_command in message
    assert message.endswith(": local-one, shared-one)")
    with pytest.raises(catalog.error, match=r"none yet\)$") as caught:
        kind.catalog(tmp_path / "no-such-folder", None).get("nope")
    assert "import" not in str(caught.value)  # no registry: only the folder is offered


def test_the_list_of_known_names_is_cut_short(kind, folder):
    for index in range(NAMES_LISTED + 3):
        kind.write(folder / f"n{index:02d}.safetensors", 0)
    catalog = kind.catalog(folder, None)
    with pytest.raises(catalog.error) as caught:
        catalog.get("nope")
    assert f"n{NAMES_LISTED - 1:02d} ...)" in str(caught.value) and f"n{NAMES_LISTED:02d}" not in str(
        caught.value
    )


def test_a_name_that_could_leave_the_folder_is_refused_before_any_lookup(kind, client, folder):
    catalog = kind.catalog(folder, client)
    for name in ("../outside", "/etc/passwd", ".hidden", "a\\b", "<lora:x:1>"):
        with pytest.raises(catalog.error, match=f"is not {catalog.a_noun} name"):
            catalog.get(name)
        assert catalog.path_of(name) is None


def test_a_refused_file_is_named_with_its_problem(kind, folder):
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)
    catalog = kind.catalog(folder, None)
    with pytest.raises(catalog.error, match=f"{catalog.noun} 'broken' is refused: .*header length"):
        catalog.get("broken")


def test_loras_and_vaes_take_the_suffix_in_a_name_and_embeddings_do_not(
    kind, client, store, folder, tmp_path
):
    kind.write(folder / "local-one.safetensors", 0)
    register(kind, client, store, tmp_path, "shared-one")
    catalog = kind.catalog(folder, client)
    if isinstance(catalog, EmbeddingCatalog):  # its name is a word in a prompt
        with pytest.raises(catalog.error, match="unknown embedding 'local-one.safetensors'"):
            catalog.get("local-one.safetensors")
        return
    assert catalog.get("local-one.SafeTensors").name == "local-one"
    assert catalog.get("shared-one.safetensors").object_key == object_key(
        catalog.get("shared-one").sha256, catalog.shared.kind
    )


def test_a_diffusers_vae_folder_is_listed_and_described_by_its_weights(folder):
    write_tensors(folder / "decoder" / DIFFUSERS_VAE_WEIGHTS, {"decoder.conv_out.weight": [3, 4, 1, 1]}, 1.0)
    (folder / "decoder" / "config.json").write_text("{}")
    write_tensors(
        folder / "no-config" / DIFFUSERS_VAE_WEIGHTS, {"decoder.conv_out.weight": [3, 4, 1, 1]}, 1.0
    )
    catalog = VaeCatalog(folder)
    assert catalog.names() == ["decoder"]
    vae = catalog.get("decoder")
    assert (vae.name, vae.path, vae.single_file) == ("decoder", folder / "decoder", False)
    assert vae.weights == folder / "decoder" / DIFFUSERS_VAE_WEIGHTS and vae.file_name == "decoder"
    assert vae.sha256 == sha256_file(vae.weights)
    with pytest.raises(catalog.error, match="unknown VAE 'no-config'"):
        catalog.get("no-config")
