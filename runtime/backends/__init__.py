"""Backends by name. ``cpu``, ``cuda`` and ``tensorrt`` are ONNX Runtime execution providers; a native TensorRT
backend registers itself here under ``trt`` when its module is available."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..bundle.manifest import Component
from ..errors import InputError
from .base import Backend

BackendFactory = Callable[[Path, Component, Any], Backend]


def _ort(provider: str) -> BackendFactory:
    def make(model_path: Path, component: Component, options: Any) -> Backend:
        from .ort import OrtBackend

        return OrtBackend(model_path, component, provider, options)

    return make


BACKENDS: dict[str, BackendFactory] = {"cpu": _ort("cpu"), "cuda": _ort("cuda"), "tensorrt": _ort("tensorrt")}


def open_backend(name: str, model_path: Path, component: Component, options: Any = None) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    return factory(model_path, component, options)
