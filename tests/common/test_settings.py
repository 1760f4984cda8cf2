"""Settings: renamed settings are still read under their old names, with a warning."""

from __future__ import annotations

import pytest

from lorafleet.common.schema.settings import Settings


def test_the_old_name_of_the_lora_device_cache_is_read_with_a_deprecation_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_LORA_CACHE_MB", "512")
    with pytest.warns(
        DeprecationWarning, match="LORAFLEET_LORA_CACHE_MB is renamed LORAFLEET_LORA_DEVICE_CACHE_MB"
    ):
        settings = Settings(home=tmp_path)
    assert settings.lora_device_cache_mb == 512


def test_the_new_name_wins_over_the_old_one(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_LORA_CACHE_MB", "512")
    monkeypatch.setenv("LORAFLEET_LORA_DEVICE_CACHE_MB", "1024")
    with pytest.warns(DeprecationWarning):
        assert Settings(home=tmp_path).lora_device_cache_mb == 1024


def test_the_disk_cache_folder_defaults_under_the_home(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.lora_disk_cache_folder == tmp_path / "cache" / "loras"
    assert (
        Settings(home=tmp_path, lora_disk_cache_dir=tmp_path / "x").lora_disk_cache_folder == tmp_path / "x"
    )
