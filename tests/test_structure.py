"""The floor plan holds: imports go one way, no loops, every Redis key built in one module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = {"common": "lorafleet.common", "producer": "lorafleet.producer", "worker": "lorafleet.worker"}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """lorafleet modules that ``path`` imports anywhere (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in MODULES else node.module)
    return {n for n in names if n in MODULES}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(path) - {name} for name, path in MODULES.items()}


def test_no_two_modules_import_each_other_directly_or_through_a_loop():
    graph = _graph()
    loops, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)


def test_common_imports_neither_side_and_the_worker_never_imports_the_producer():
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("lorafleet.common"):
            assert not {i for i in imported if not i.startswith("lorafleet.common")}, name
        if name.startswith("lorafleet.worker"):
            assert not {i for i in imported if i.startswith("lorafleet.producer")}, name


def test_the_producer_imports_the_worker_only_from_its_cli_package():
    for name, imported in _graph().items():
        if name.startswith("lorafleet.producer") and not name.startswith("lorafleet.producer.cli"):
            assert not {i for i in imported if i.startswith("lorafleet.worker")}, name
    text = (REPO / "producer" / "cli" / "worker_side.py").read_text()
    assert "import_module" in text


@pytest.mark.slow  # a Python process
def test_lorafleet_submit_help_loads_no_torch():
    code = (
        "import sys\n"
        "sys.argv = ['lorafleet', 'submit', '--help']\n"
        "from lorafleet.producer.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "assert not heavy, heavy[:5]\n"
        "assert not [m for m in sys.modules if m.startswith('lorafleet.worker')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--model" in result.stdout


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_every_redis_key_is_built_in_the_keys_module():
    offenders = []
    for name, path in MODULES.items():
        if name == "lorafleet.common.schema.keys":
            continue
        for line, text in _string_constants(path):
            if "lorafleet:" in text or text.startswith("lorafleet.model."):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not offenders, "Redis keys built outside common/schema/keys.py:\n" + "\n".join(offenders)


def test_every_package_is_in_the_distribution():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomllib's original, in the dev extra for 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed, "pyproject.toml's packages and the folders with an __init__.py differ"


LAYERS = ("schema", "infra", "catalog", "fleet", "services")
"""lorafleet.common's layers, lowest first: a module imports only its own layer and those below."""


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if parts[:2] != ["lorafleet", "common"] or len(parts) < 3 or parts[2] not in LAYERS:
        return None
    return LAYERS.index(parts[2])


def test_common_is_in_layers_and_each_imports_only_its_own_and_lower_ones():
    graph = _graph()
    flat = [n for n in graph if n.startswith("lorafleet.common.") and _layer(n) is None]
    assert not flat, f"modules of lorafleet.common outside its layers {LAYERS}: {flat}"
    wrong = [
        f"{name} -> {other}"
        for name, imported in graph.items()
        if (mine := _layer(name)) is not None
        for other in imported
        if (theirs := _layer(other)) is not None and theirs > mine
    ]
    assert not wrong, "imports up the layers: " + "; ".join(sorted(wrong))


def test_no_module_is_past_500_lines():
    long = {
        str(path.relative_to(REPO)): n
        for path in sorted(REPO.glob("*/**/*.py"))
        if ".venv" not in path.parts and (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, f"split these (a module is read in one sitting): {long}"


def test_every_worker_module_the_cli_asks_for_exists():
    """The CLI reaches the worker side by module name (cli/worker_side.py): a moved module
    must not leave a name that imports nothing."""
    asked = set()
    for path in (REPO / "producer" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "worker_side"
                and isinstance(node.args[0], ast.Constant)
            ):
                asked.add(f"lorafleet.worker.{node.args[0].value}")
    assert asked and not asked - set(MODULES), sorted(asked - set(MODULES))


PROCESS_STARTERS = {"run_cli", "WorkerProcess", "start_worker", "Popen", "run_worker_cli"}
"""What starts a real process in a test (tests/helpers.py, fixtures), beside any use of
``subprocess`` (Redis and S3 servers that fixtures start are the suite's, not the test's)."""
NOT_A_PROCESS_TEST = {
    "tests/worker/test_checkpoints.py::test_a_copy_left_half_written_by_a_dead_worker_is_swept",
    "tests/test_benches.py::test_a_gpu_script_parses",
}
"""Tests whose process is not lorafleet's: `true` for a pid that is dead, `bash -n` on a script."""


def _marked_slow(decorators: list[ast.expr]) -> bool:
    return any("slow" in ast.unparse(d) for d in decorators)


def test_every_test_that_starts_a_process_is_marked_slow():
    """`make test-fast` (the edit loop) leaves out real-process tests by their `slow` mark."""
    unmarked = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_slow = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and "slow" in ast.unparse(node.value)
            for node in tree.body
        )
        if module_slow:
            continue
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            names |= {
                n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            }
            name = f"{path.relative_to(REPO)}::{node.name}"
            subprocesses = any(
                isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "subprocess"
                for n in ast.walk(node)
            )
            starts = (names & PROCESS_STARTERS or subprocesses) and name not in NOT_A_PROCESS_TEST
            if starts and not _marked_slow(node.decorator_list):
                unmarked.append(name)
    assert not unmarked, "start a process but are not marked slow: " + ", ".join(unmarked)


RECORDS_NAMED_BY = {
    "common/fleet/store.py": "creates records (and takes back a create that failed half way); reads",
    "common/fleet/lifecycle.py": "every change of a record, one script each",
    "common/services/grids.py": "reads a sweep's records",
    "common/catalog/input_retention.py": "reads records' remaining lifetimes",
}
"""The modules that name a job record's key (``keys.job``), and what for."""


def test_job_records_are_named_only_where_they_are_created_changed_or_read():
    """Every change of a record is a fleet/lifecycle.py transition; a module that names a
    record's key anywhere else (a write that skips the lifecycle) fails here."""
    naming = {str(path.relative_to(REPO)) for path in _modules().values() if "keys.job(" in path.read_text()}
    assert naming == set(RECORDS_NAMED_BY), naming
