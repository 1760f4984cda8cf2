"""`lorafleet loras list|inspect|import` and `lorafleet models list`, as a user runs them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import lorafleet_env, run_cli


@pytest.mark.slow
def test_loras_list_shows_every_file_and_refuses_corrupt_ones(home):
    (home / "autoimport" / "lora" / "broken.safetensors").write_bytes(b"\xff" * 40)
    result = run_cli(["loras", "list", "--json"], lorafleet_env(home, None))
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["watercolor"]["format"] == "kohya-lora" and rows["watercolor"]["family"] == "sd15"
    assert rows["texture-locon"]["format"] == "kohya-locon"
    assert "does not fit the file" in rows["broken"]["refused"]


@pytest.mark.slow
def test_inspect_a_name_against_a_model_reports_matched_and_unmatched_keys(home):
    env = lorafleet_env(home, None)
    result = run_cli(["loras", "inspect", "watercolor", "--model", "tiny-sd15", "--json"], env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["trigger_words"] == ["watercolor"] and len(data["sha256"]) == 64
    assert data["match"]["matched"] == {"text_encoder": 8, "unet": 48}
    assert data["match"]["unmatched"] == [] and data["match"]["family_mismatch"] is None


@pytest.mark.slow
def test_inspect_against_the_wrong_family_says_so(home):
    env = lorafleet_env(home, None)
    result = run_cli(
        ["loras", "inspect", str(home / "xl-loras" / "watercolor.safetensors"), "--model", "tiny-sd15"], env
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "the LoRA is for sdxl, the model is sd15" in text
    assert "unmatched keys" in text


@pytest.mark.slow
def test_inspect_refuses_pickles_with_the_reason(home, tmp_path):
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"\x80\x04")
    result = run_cli(["loras", "inspect", str(pickle)], lorafleet_env(home, None))
    assert result.returncode == 2 and "arbitrary code" in result.stderr


@pytest.mark.slow
def test_import_copies_a_checked_file_usable_by_name(home, tmp_path):
    env = lorafleet_env(home, None)
    source = tmp_path / "My Style v2.safetensors"
    source.write_bytes((home / "autoimport" / "lora" / "ink-sketch.safetensors").read_bytes())
    result = run_cli(["loras", "import", str(source)], env)
    assert result.returncode == 0, result.stderr
    assert "imported My Style v2: peft" in result.stdout
    assert (home / "autoimport" / "lora" / "My Style v2.safetensors").read_bytes() == source.read_bytes()
    again = run_cli(["loras", "import", str(source)], env)
    assert "already imported" in again.stdout
    clash = run_cli(
        [
            "loras",
            "import",
            str(home / "autoimport" / "lora" / "watercolor.safetensors"),
            "--name",
            "My Style v2",
        ],
        env,
    )
    assert clash.returncode == 2 and "already imported" in clash.stderr and "--force" in clash.stderr
    forced = run_cli(
        [
            "loras",
            "import",
            str(home / "autoimport" / "lora" / "watercolor.safetensors"),
            "--name",
            "My Style v2",
            "--force",
        ],
        env,
    )
    assert forced.returncode == 0


@pytest.mark.slow
def test_import_refuses_bad_files_and_names(home, tmp_path):
    env = lorafleet_env(home, None)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    result = run_cli(["loras", "import", str(bad)], env)
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    good = home / "autoimport" / "lora" / "watercolor.safetensors"
    sneaky = run_cli(["loras", "import", str(good), "--name", "../escape"], env)
    assert sneaky.returncode == 2 and "--name" in sneaky.stderr
    assert not (home / "autoimport" / "escape.safetensors").exists()


@pytest.mark.slow
def test_models_list_names_families_and_queues(home):
    result = run_cli(["models", "list"], lorafleet_env(home, None))
    assert (
        "tiny-sd15" in result.stdout
        and "tiny-sdxl" in result.stdout
        and "lorafleet.model.tiny-sdxl" in result.stdout
    )


@pytest.mark.slow
def test_a_flux_model_and_its_loras_are_listed_and_inspected_with_their_family(home):
    import torch
    from safetensors.torch import load_file, save_file

    from lorafleet.worker.tiny import make_demo_loras, make_tiny_model

    make_tiny_model(home / "models" / "tiny-flux1", family="flux1")
    [kohya, *_] = make_demo_loras(home / "models" / "tiny-flux1", home / "autoimport" / "lora")
    state = load_file(str(kohya))
    state["lora_unet_double_blocks_0_img_attn_nothing.lora_down.weight"] = torch.zeros(4, 32)
    save_file(
        state,
        str(home / "autoimport" / "lora" / "flux1-extra.safetensors"),
        metadata={"ss_base_model_version": "flux1"},
    )
    env = lorafleet_env(home, None)
    models = {row["name"]: row for row in json.loads(run_cli(["models", "list", "--json"], env).stdout)}
    assert models["tiny-flux1"]["family"] == "flux1"
    result = run_cli(["loras", "inspect", "flux1-extra", "--model", "tiny-flux1", "--json"], env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["match"]["family_mismatch"] is None
    loras = {row["name"]: row for row in json.loads(run_cli(["loras", "list", "--json"], env).stdout)}
    assert {loras[f"flux1-{fmt}"]["family"] for fmt in ("kohya", "bfl", "peft", "onetrainer", "xlabs")} == {
        "flux1"
    }
    assert data["match"]["matched"]["transformer"] > 0 and data["match"]["matched"]["text_encoder"] > 0
    assert data["match"]["unmatched"] == ["lora_unet_double_blocks_0_img_attn_nothing.lora_down.weight"]
