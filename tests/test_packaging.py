"""One distribution, one namespace: runtime/ is ``edgediff``; export/, engines/, bench/ are its subpackages through
setuptools ``package-dir``. The explicit ``packages`` list is easy to forget when a folder is added, and an editable
install hides the mistake (it maps whole folders), so the wheel is also built and imported from outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgediff": "runtime", "edgediff.export": "export", "edgediff.engines": "engines",
           "edgediff.bench": "bench", "edgediff.serve": "serve"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _folder_of(package: str) -> Path:
    """Where ``package`` lives in the checkout, following package-dir the way setuptools does."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in FOLDERS:
            return ROOT / FOLDERS[head] / Path(*parts[n:])
    raise AssertionError(f"{package} is outside every package-dir mapping")


def test_package_dir_is_the_documented_mapping():
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == FOLDERS


def test_packages_list_names_every_python_folder_and_nothing_else():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = set()
    for package, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([package, *rel.parts]))
    assert listed == on_disk, f"add to / remove from pyproject packages: {sorted(listed ^ on_disk)}"
    for package in listed:
        assert (_folder_of(package) / "__init__.py").is_file()


def test_installed_namespace_points_at_the_four_folders():
    code = ("import json, edgediff, edgediff.export, edgediff.engines, edgediff.bench, edgediff.serve;"
            "print(json.dumps({m.__name__: m.__file__ for m in (edgediff, edgediff.export, edgediff.engines,"
            " edgediff.bench, edgediff.serve)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)
    files = json.loads(out.stdout)
    for package, folder in FOLDERS.items():
        assert Path(files[package]).resolve() == (ROOT / folder / "__init__.py").resolve(), (package, files[package])


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_checkout(tmp_path):
    """A normal (non-editable) install: build the wheel, install it into a bare target folder, import from there."""
    src, dist = tmp_path / "src", tmp_path / "dist"
    # a copy, because setuptools builds in the source tree (build/, *.egg-info) and must not litter the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv",
                                                            "venv", ".whl", ".pytest_cache", "dist"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "Could not find a version that satisfies" in build.stderr:
        pytest.skip("no package index reachable to fetch the build backend (setuptools>=77)")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("edgediff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "edgediff/bench/schema.json" in names
    for package in _pyproject()["tool"]["setuptools"]["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
    # the built-in model ships as package data: every file of it, or the README's main command fails after install
    shipped = {p.relative_to(ROOT / "runtime").as_posix() for p in (ROOT / "runtime" / "models").rglob("*")
               if p.is_file()}
    assert "models/shapes/edgediff.json" in shipped
    assert {"edgediff/" + s for s in shipped} <= names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = ("import edgediff, edgediff.export, edgediff.engines, edgediff.bench, edgediff.cli, edgediff.bench.cli,"
            " edgediff.serve;"
            "print(edgediff.__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).is_relative_to(site)
