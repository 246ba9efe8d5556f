"""The package's shape: no import cycles, modules of one job, class names only in the class map."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "helpers"

#: Longest module allowed; a module past this is doing two jobs (issue 15).
MAX_LINES = 550


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the helpers modules it imports, at top level or inside functions."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name and t != "helpers":
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_modules_are_small():
    too_long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_class_names_only_in_the_class_map():
    """Code asks the class map for its background/headline roles; it never spells a class name."""
    found = []
    for name, path in _modules().items():
        if name == "helpers.config":  # the legacy fallback for maps written before roles
            continue
        for line, value in _string_constants(path):
            if value in ("Tumor", "Background"):  # the names behind the two roles
                found.append(f"{path.relative_to(ROOT)}:{line} {value!r}")
    assert not found, "class names in code (use class_map.background / .headline): " + ", ".join(found)


def test_exceptions_live_in_errors():
    found = []
    for name, path in _modules().items():
        if name == "helpers.errors":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not found, "exception classes outside helpers/errors.py: " + ", ".join(found)


def test_importing_the_package_does_no_work():
    """Importing every module neither changes the umask nor touches the network."""
    mods = [m for m in _modules() if m != "helpers"]
    code = "\n".join([
        "import os, socket, importlib",
        "calls = []",
        "real_umask = os.umask",
        "os.umask = lambda m: (calls.append('umask'), real_umask(m))[1]",
        "class NoNet(socket.socket):",
        "    def connect(self, *a):",
        "        calls.append('connect'); raise OSError('no network in this test')",
        "socket.socket = NoNet",
        f"for m in {mods!r}:",
        "    importlib.import_module(m)",
        "print(sorted(set(calls)))",
    ])
    env = {"SM_FRAMEWORK": "tf.keras", "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_notebook_parameters_use_none_for_not_set(notebook):
    """One "not set" value: ``None`` (not 0, "" or "none") in every parameters cell."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    bad = []
    for line in cell.source.splitlines():
        code, _, comment = line.partition("#")
        value = code.partition("=")[2].strip()
        after_zero = comment.partition("0:")[2].strip().lower()
        if value in ('""', "''", "'none'", '"none"') or (
                value in ("0", "0.0") and after_zero and not after_zero.startswith(("skip", "off", "no "))):
            bad.append(line.strip())
    assert not bad, f"{notebook.name}: 'not set' must be None: {bad}"
