"""The package layout's contracts: one-way flow ir -> engines, no import circles, no module imports a CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> installed package name (pyproject's package-dir)
PACKAGES = {"deployq": "deployq", "exporters": "deployq.exporters", "calib": "deployq.calib"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    mods = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            mods[_module_name(path)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """deployq modules ``name`` imports (module level and inside functions), resolved to known module names."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "deployq":
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_exporters_have_no_import_circle(graph):
    exp = {m: {d for d in deps if d.startswith("deployq.exporters")} for m, deps in graph.items()
           if m.startswith("deployq.exporters")}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in exp.get(m, ()):
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue  # a package and its own modules
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack + [m, d]))
            if not state.get(d):
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(exp):
        if not state.get(m):
            visit(m, [])


def test_ir_imports_no_engine_and_nothing_imports_a_cli(graph):
    engines = ("deployq.exporters.ncnn", "deployq.exporters.tengine", "deployq.exporters.onnx")
    for m, deps in graph.items():
        if m.startswith("deployq.exporters.ir"):
            assert not [d for d in deps if d.startswith(engines)], f"{m} imports an engine package: {deps}"
        if m != "deployq.cli":
            clis = [d for d in deps if d.endswith(".cli") or d.endswith("_cli")]
            assert not clis, f"{m} imports a CLI module: {clis}"
