"""The built-in default model shipped as package data (see docs and export/recipes/shapes)."""
from __future__ import annotations

from pathlib import Path

from .errors import BundleNotFound

DEFAULT_MODEL = "shapes"


def default_bundle() -> Path:
    path = Path(__file__).parent / "models" / DEFAULT_MODEL
    if not (path / "edgediff.json").is_file():
        raise BundleNotFound(f"the built-in model is not installed at {path}; pass -m BUNDLE (a folder made by edgediff export)")
    return path
