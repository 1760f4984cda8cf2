"""The README matches the code: every setting and every command is documented."""

from __future__ import annotations

import re

import typer.main

from lorafleet.common.schema.settings import RENAMED, Settings
from lorafleet.producer.cli import app
from tests.helpers import REPO

README = (REPO / "README.md").read_text()


def command_paths(group, prefix=""):
    click_group = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            yield from command_paths(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}"


def test_every_setting_is_documented():
    documented = set(re.findall(r"LORAFLEET_[A-Z0-9_]+", README))
    settings = {f"LORAFLEET_{name.upper()}" for name in Settings.model_fields}
    assert settings - documented == set()
    renamed = {f"LORAFLEET_{old.upper()}" for old in RENAMED}  # still read, documented as deprecated
    assert documented - settings - renamed == set(), "the README names settings that do not exist"


def test_every_command_is_documented():
    missing = [
        path
        for path in command_paths(app)
        if path != "version" and f"lorafleet {path.split()[0]}" not in README
    ]
    assert missing == []


def test_readme_gives_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_every_job_field_is_in_the_jobs_table():
    from lorafleet.common.schema.jobs import GenerationJob

    table = README.split("### Jobs", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `([a-z_]+)`", table, re.MULTILINE)) | set(
        re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", table, re.MULTILINE)
    )
    assert set(GenerationJob.model_fields) - {"job_id", "batch_id"} - documented == set()


def test_the_readmes_code_layout_names_every_module_and_folder():
    start = README.index("Code layout (")
    layout = README[README.index("```\n", start) : README.index("```\n", README.index("```\n", start) + 4)]
    missing = []
    for side in ("common", "producer", "worker"):
        for path in sorted((REPO / side).rglob("*.py")):
            if path.name != "__init__.py" and path.name not in layout:
                missing.append(str(path.relative_to(REPO)))
        for folder in sorted(p for p in (REPO / side).iterdir() if p.is_dir() and p.name != "__pycache__"):
            if f"{folder.name}/" not in layout:
                missing.append(f"{folder.relative_to(REPO)}/")
    assert not missing, f"not in the README's code layout: {missing}"
