"""Backends by name. ``cpu``, ``cuda`` and ``tensorrt`` are ONNX Runtime execution providers; ``trt`` is the native
TensorRT backend running engines built by ``edgediff build``."""
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


def _trt(model_path: Path, component: Component, options: Any) -> Backend:
    from .trt import TrtBackend  # imports tensorrt and cuda-python only when asked for

    return TrtBackend(model_path, component, options)


# "tensorrt" is ONNX Runtime's TensorRT execution provider; "trt" is the native backend (engines from edgediff build)
BACKENDS: dict[str, BackendFactory] = {"cpu": _ort("cpu"), "cuda": _ort("cuda"), "tensorrt": _ort("tensorrt"),
                                       "trt": _trt}


def open_backend(name: str, model_path: Path, component: Component, options: Any = None) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    return factory(model_path, component, options)
