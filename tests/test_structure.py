"""The shape of the code: imports point down the pipeline, the engine never imports Streamlit or
the dashboard, only the run package spells run-directory file names, modules stay small.

Read with the standard library's ``ast`` only: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.run import layout

ROOT = Path(__file__).resolve().parent.parent
# The engine's layers, lowest first: a module may import its own layer and the ones before it.
LAYERS = [
    "errors",
    "files",
    "parallel",
    "data",
    "models",
    "attribution",
    "run",
    "search",
    "assemble",
    "explore",
    "explain",
    "curate",
    "evaluate",
    "demo",
    "cli",
]
MAX_LINES = 400


def _modules(*folders: str) -> dict[str, Path]:
    found = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules("engine", "dashboard")


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports (absolute names, at any depth of the file), with lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in MODULES else base, node.lineno))
    return out


def _project_imports(name: str) -> set[str]:
    return {m for m, _ in _imports(name, MODULES[name]) if m in MODULES}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_every_engine_package_has_a_layer():
    top = {name.split(".")[1] for name in MODULES if name.startswith("engine.")}
    assert top <= set(LAYERS), sorted(top - set(LAYERS))


def test_no_import_cycles():
    graph = {name: _project_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_engine_imports_point_down_the_pipeline():
    wrong = []
    for name in MODULES:
        if not name.startswith("engine.") or name.count(".") < 1:
            continue
        for dep in _project_imports(name):
            if dep.startswith("engine.") and _layer(dep) > _layer(name):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_engine_never_imports_streamlit_or_the_dashboard():
    wrong = [
        f"{name}:{line} imports {dep}"
        for name, path in MODULES.items()
        if name.startswith("engine")
        for dep, line in _imports(name, path)
        if dep.split(".")[0] in ("streamlit", "dashboard")
    ]
    assert not wrong, wrong


def _string_literals(tree: ast.AST) -> list[tuple[str, int]]:
    """String constants of a module, docstrings excepted (f-strings: their literal parts)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.value, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_only_the_run_package_spells_run_file_names():
    names = layout.FILE_NAMES
    wrong = []
    for name, path in {**MODULES, **_modules("bench")}.items():
        if name.startswith("engine.run"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for text, line in _string_literals(tree):
            hit = next((n for n in names if text == n or text.endswith(("/" + n, "." + n))), None)
            if hit:
                wrong.append(f"{path.relative_to(ROOT)}:{line} spells {hit!r}")
    assert not wrong, wrong


def test_the_literal_check_would_catch_a_run_file_name():
    tree = ast.parse('"""scores.npy in a docstring is fine."""\nx = run / "scores.npy"\n')
    assert [t for t, _ in _string_literals(tree)] == ["scores.npy"]


def test_modules_stay_small():
    sizes = {name: path.read_text(encoding="utf-8").count("\n") for name, path in MODULES.items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}
