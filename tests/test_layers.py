"""The package's shape: one direction of imports, no cycles, a version."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import move

PACKAGE = Path(move.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """{module: project modules it imports}, imports inside functions included."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "move":
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "move"}
        graph[name] = targets
    return {m: {t for t in ts if t in graph} for m, ts in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_known_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = module_imports()
    assert len(graph) > 50 and graph["move.cli"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_layers_contract_holds():
    """import-linter's layers contract in pyproject.toml (imports inside functions count)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed")
    result = subprocess.run([lint], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_version_is_exposed():
    assert move.__version__ and move.__version__[0].isdigit()
    out = subprocess.run([sys.executable, "-m", "move", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"move {move.__version__} ({move.DISTRIBUTION})"


def test_tree_passes_ruff_lint_and_format_check():
    """ruff, configured in pyproject.toml: lint rules and the formatter's style."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extras: pip install -e '.[test]')")
    for command in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(command, cwd=PACKAGE.parent, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stdout[-3000:])
