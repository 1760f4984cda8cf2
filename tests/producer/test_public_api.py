"""The producer's public surface, the promise that it never needs torch, and the one that the
code and its tests run on every Python that pyproject.toml allows (3.10 and later)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lorafleet.producer
from tests.helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # tomllib's original, in the dev extra for 3.10
    import tomli as tomllib

PUBLIC = [
    "Client",
    "ConfigError",
    "GenerationJob",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobRecord",
    "JobRejected",
    "JobStatus",
    "LoraSpec",
    "LorafleetError",
    "Priority",
    "Sampler",
    "Settings",
    "TransientError",
]

BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "safetensors", "accelerate"):
            raise ImportError(f"the producer imported {name}")
sys.meta_path.insert(0, Block())
"""


def test_public_api_is_pinned():
    assert sorted(lorafleet.producer.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(lorafleet.producer, name) is not None


@pytest.mark.slow  # a Python process
def test_producer_side_imports_and_runs_without_torch(settings, tmp_path):
    code = (
        BLOCK_TORCH
        + f"""
import lorafleet.producer, lorafleet.producer.cli
from lorafleet.producer import Client, Settings
from pathlib import Path
client = Client(Settings(home=Path({str(settings.home)!r}), broker_url={settings.broker_url!r}))
handle = client.submit({{"model": "tiny-sd15", "prompt": "x", "loras": [{{"name": "watercolor"}}]}})
print(client.get(handle.job_id).status.value)
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "queued"


@pytest.mark.slow  # a Python process
def test_worker_commands_say_how_to_install_the_worker_side():
    code = (
        BLOCK_TORCH
        + """
import sys
from lorafleet.producer.cli import app
sys.argv = ["lorafleet", "make-tiny-model", "/tmp/nowhere"]
app()
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3
    assert "pip install 'lorafleet[worker]'" in result.stderr


def test_base_dependencies_leave_out_the_worker_side():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    heavy = ("torch", "diffusers", "transformers", "safetensors", "accelerate")
    assert not [
        d for d in project["dependencies"] if d.split("[")[0].split(">")[0].split("=")[0].strip() in heavy
    ]
    assert {d.split(">")[0] for d in project["optional-dependencies"]["worker"]} >= set(heavy)
    assert project["scripts"] == {"lorafleet": "lorafleet.producer.cli:main"}


NEW_IN_311: dict[str, set[str] | None] = {
    "tomllib": None,
    "wsgiref.types": None,
    "typing": {
        "Self",
        "LiteralString",
        "Never",
        "assert_never",
        "assert_type",
        "reveal_type",
        "Required",
        "NotRequired",
        "TypeVarTuple",
        "Unpack",
        "dataclass_transform",
        "get_overloads",
    },
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember"},
    "asyncio": {"TaskGroup", "Runner", "timeout", "timeout_at", "Timeout", "Barrier"},
    "datetime": {"UTC"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
}
"""Standard-library modules (None) and names new in Python 3.11, which 3.10 lacks."""
KNOWN_UNGUARDED: set[str] = set()
"""Files that still use one of them unguarded (issue 20): each must still be found, so that
its entry goes once it is fixed."""


def _names(node: ast.AST) -> set[str]:
    return {
        n.attr if isinstance(n, ast.Attribute) else n.id
        for n in ast.walk(node)
        if isinstance(n, (ast.Attribute, ast.Name))
    }


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` runs only where it can: under ``if sys.version_info ...`` or ``if
    TYPE_CHECKING``, or in a ``try`` that catches ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and _names(parent.test) & {"version_info", "TYPE_CHECKING"}:
            return True
        if isinstance(parent, ast.Try) and child in parent.body:
            caught = set().union(*(_names(h.type) for h in parent.handlers if h.type))
            if caught & {"ImportError", "ModuleNotFoundError"}:
                return True
        child, parent = parent, parents.get(parent)
    return False


def _new_in_311(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each unguarded use of something NEW_IN_311 lists."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        used: list[str] = []
        if isinstance(node, ast.Import):
            used = [a.name for a in node.names if a.name in NEW_IN_311 and NEW_IN_311[a.name] is None]
        elif isinstance(node, ast.ImportFrom) and node.module in NEW_IN_311:
            names = NEW_IN_311[node.module]
            if names is None:
                used = [node.module]
            else:
                used = [f"{node.module}.{a.name}" for a in node.names if a.name in names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in (NEW_IN_311.get(node.value.id) or ()):
                used = [f"{node.value.id}.{node.attr}"]
        elif isinstance(node, ast.Name) and node.id in ("ExceptionGroup", "BaseExceptionGroup"):
            used = [node.id]
        elif isinstance(node, getattr(ast, "TryStar", ())):
            used = ["except*"]
        found += [(node.lineno, what) for what in used if not _guarded(node, parents)]
    return sorted(found)


def _python_files() -> list[Path]:
    """The project's Python files and its tests' (not the virtualenv, nor other hidden folders)."""
    files = []
    for top in sorted(REPO.iterdir()):
        if top.name.startswith(".") or top.name.endswith(".egg-info"):
            continue
        if top.is_dir():
            files += sorted(top.rglob("*.py"))
        elif top.suffix == ".py":
            files.append(top)
    return files


def test_nothing_new_in_python_311_is_used_without_a_guard():
    offenders = {}
    for path in _python_files():
        found = _new_in_311(ast.parse(path.read_text(), filename=str(path)))
        if found:
            offenders[path.relative_to(REPO).as_posix()] = found
    assert set(offenders) - KNOWN_UNGUARDED == set(), (
        "pyproject.toml allows Python 3.10, which lacks these (guard them with `if sys.version_info "
        f">= (3, 11):` and a fallback such as tomli): {offenders}"
    )
    assert KNOWN_UNGUARDED <= set(offenders), "fixed: drop it from KNOWN_UNGUARDED"


def test_the_guard_check_finds_what_it_looks_for():
    def found(code: str) -> list[str]:
        return [what for _, what in _new_in_311(ast.parse(code))]

    assert found("import tomllib\nfrom typing import Self, Any\nimport asyncio\nasyncio.TaskGroup()") == [
        "tomllib",
        "typing.Self",
        "asyncio.TaskGroup",
    ]
    assert found("def f():\n    import tomllib") == ["tomllib"]
    assert not found(
        "import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli"
    )
    assert not found("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib")
    assert not found("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from typing import Self")
