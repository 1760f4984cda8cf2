"""The deploy guide (docs/deploy.md) and every deploy file name only what exists.

Every ``lorafleet ...`` command in the guide's shell blocks parses with the real CLI, the README
links the guide, and every LORAFLEET_* variable named in deploy/, the guide or .dockerignore is a
Settings field.
"""

from __future__ import annotations

import re

from tests.deploy.manifests import (
    _SHELL_OPERATORS,
    CLI,
    DEPLOY,
    DEPLOY_DOC,
    SETTINGS,
    _shell_words,
    parse_lorafleet,
)
from tests.helpers import REPO


def test_only_lorafleet_settings_are_named_lorafleet_everywhere():
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DEPLOY_DOC, REPO / ".dockerignore"]
    for path in files:
        named = set(re.findall(r"LORAFLEET_[A-Z0-9_]+", path.read_text()))
        assert named - SETTINGS == set(), f"{path.relative_to(REPO)} names settings that do not exist"


def test_the_deploy_guide_commands_are_real_and_the_readme_links_it():
    text = DEPLOY_DOC.read_text()
    blocks = re.findall(r"```(?:sh|bash|console)\n(.*?)```", text, flags=re.S)
    assert blocks
    checked = 0
    for block in blocks:
        script = re.sub(r"\\\n", " ", block)
        for line in script.splitlines():
            words = _shell_words(line.split(" #", 1)[0]) if line.strip() and not line.startswith("#") else []
            for n, word in enumerate(words):
                if word != "lorafleet" or (n and words[n - 1].startswith("-") and words[n - 1] != "--"):
                    continue
                call = []
                for rest in words[n + 1 :]:
                    if _SHELL_OPERATORS.match(rest):
                        break
                    call.append(rest)
                if call and not call[0].startswith("-") and call[0] in CLI.commands:
                    try:
                        parse_lorafleet(call)
                    except AssertionError as exc:  # a file on the reader's machine is fine
                        if "does not exist" not in str(exc):
                            raise
                    checked += 1
    assert checked >= 5
    assert "docs/deploy.md" in (REPO / "README.md").read_text()
