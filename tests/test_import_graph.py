"""Dependency directions, checked from the source (so imports inside functions count too):

    runtime/ (the core, package ``edgediff``)  never imports  edgediff.export, .bench, .engines or .cli
    export/                                    never imports  edgediff.bench
    engines/ and bench/ may import the core; the core never imports them back.

runtime/cli.py is the composition root: it wires the core to engines/export/bench inside its commands, so it is the one
core file allowed to import them (lazily). Each file is parsed with ``ast``; relative imports are resolved against the
file's package, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name count as imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"runtime": "edgediff", "export": "edgediff.export", "engines": "edgediff.engines", "bench": "edgediff.bench"}
COMPOSITION_ROOT = ROOT / "runtime" / "cli.py"

CORE_MUST_NOT_IMPORT = ("edgediff.export", "edgediff.bench", "edgediff.engines", "edgediff.serve", "edgediff.cli")
EXPORT_MUST_NOT_IMPORT = ("edgediff.bench",)


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__) of a source file."""
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.name != "__init__.py":
        parts.append(rel.stem)
    return ".".join(parts), rel.name == "__init__.py"


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module name the file may import, with its line: ``from X import a`` yields X and X.a (``a`` may be a
    submodule), relative forms resolved."""
    name, is_package = module_name(path)
    package = name if is_package else name.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_dynamic_import(node.func):
            target = node.args[0].value
            if target.startswith(".") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                target = _resolve_relative(target, str(node.args[1].value))
            out.append((node.lineno, target))
    return out


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _resolve_relative(name: str, package: str) -> str:
    level = len(name) - len(name.lstrip("."))
    parts = package.split(".")
    return ".".join(parts[: len(parts) - (level - 1)] + [name.lstrip(".")]).rstrip(".")


def violations(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target in imported_names(path)
            if any(target == f or target.startswith(f + ".") for f in forbidden)]


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


CORE = [p for p in sources("runtime") if p != COMPOSITION_ROOT]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_engines_export_bench_or_the_cli(path):
    assert violations(path, CORE_MUST_NOT_IMPORT) == []


def test_export_never_imports_bench():
    found = [v for p in sources("export") for v in violations(p, EXPORT_MUST_NOT_IMPORT)]
    assert found == []


# -- the checker itself: each form it must catch, and what it must let through ----------------------------------
@pytest.mark.parametrize("code", [
    "import edgediff.engines.tensorrt.build",
    "from edgediff.engines.tensorrt import device",
    "from edgediff import engines",
    "from edgediff import cli",
    "from ..engines.tensorrt.cache import EngineCache",
    "from .. import bench",
    "def f():\n    from edgediff.export import pipeline_export\n",
    "import importlib\nimportlib.import_module('edgediff.engines.tensorrt.build')",
    "from importlib import import_module\nimport_module('..bench.runner', 'edgediff.backends')",
    "__import__('edgediff.export')",
])
def test_checker_catches_every_form(tmp_path, monkeypatch, code):
    path = _fake_core_file(tmp_path, monkeypatch, code)
    assert violations(path, CORE_MUST_NOT_IMPORT), code


@pytest.mark.parametrize("code", [
    "from edgediff import __version__", "from .. import errors", "from ..cli_types import SIZE",
    "import edgediff.backends.tensorrt.cache", "from . import ort",
])
def test_checker_lets_core_imports_through(tmp_path, monkeypatch, code):
    assert violations(_fake_core_file(tmp_path, monkeypatch, code), CORE_MUST_NOT_IMPORT) == []


def _fake_core_file(tmp_path: Path, monkeypatch, code: str) -> Path:
    """A file at runtime/backends/x.py of a fake tree, so relative imports resolve as they would in the core."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    path = tmp_path / "runtime" / "backends" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text(code + "\n", encoding="utf-8")
    return path
