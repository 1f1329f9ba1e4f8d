"""edgediff: a lean, torch-free inference runtime for Stable Diffusion-family text-to-image models.

``import edgediff`` stays light: numpy and the error types. The pipeline (ONNX Runtime, tokenizers, PIL) loads on
first use of ``edgediff.Pipeline``.
"""
from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import EdgediffError

__all__ = ["__version__", "EdgediffError", "Pipeline", "GenerationResult"]


def __getattr__(name: str) -> Any:  # PEP 562: lazy heavy imports
    if name in ("Pipeline", "GenerationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'edgediff' has no attribute {name!r}")
