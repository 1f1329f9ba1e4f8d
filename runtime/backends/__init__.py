"""Backends by name. ``cpu``, ``cuda`` and ``tensorrt`` are ONNX Runtime execution providers; ``trt`` is the native
TensorRT backend running engines built by ``edgediff build``.

A factory is given the Bundle it serves, the component, the component's graph path (already resolved and, unless
the caller turned verification off, checked against the manifest) and the backend's own options object. Backends
that run the ONNX graph open the path; the TensorRT backend reads its engine from the bundle's engine cache.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..bundle.manifest import Component
from ..errors import InputError
from .base import Backend

if TYPE_CHECKING:
    from ..bundle.reader import Bundle

BackendFactory = Callable[["Bundle", Component, Path, Any], Backend]


def _ort(provider: str) -> BackendFactory:
    def make(bundle: "Bundle", component: Component, model_path: Path, options: Any) -> Backend:
        from .ort import OrtBackend

        return OrtBackend(model_path, component, provider, options)

    return make


def _trt(bundle: "Bundle", component: Component, model_path: Path, options: Any) -> Backend:
    from .tensorrt.backend import TrtBackend  # imports tensorrt and cuda-python only when an engine is opened

    return TrtBackend(bundle, component, options)  # runs the cached engine, not the graph at model_path


# "tensorrt" is ONNX Runtime's TensorRT execution provider; "trt" is the native backend (engines from edgediff build)
BACKENDS: dict[str, BackendFactory] = {"cpu": _ort("cpu"), "cuda": _ort("cuda"), "tensorrt": _ort("tensorrt"),
                                       "trt": _trt}


def open_backend(name: str, bundle: "Bundle", component: Component, model_path: Path, options: Any = None) -> Backend:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    return factory(bundle, component, model_path, options)


# -- the optional profiling capability (backends/base.py: Profiling) ---------------------------------------------
def _ort_profiling(folder: Path) -> Any:
    from .ort import OrtOptions

    return OrtOptions(enable_profiling=True, profile_file_prefix=str(folder / "ort"))


# backend name -> folder -> that backend's options with its operator profiler on, writing its trace under folder.
# A backend missing here has no profiler (the native TensorRT backend).
PROFILING: dict[str, Callable[[Path], Any]] = {"cpu": _ort_profiling, "cuda": _ort_profiling,
                                               "tensorrt": _ort_profiling}


def profiling_options(name: str, folder: str | Path) -> Any:
    """Options that open backend ``name`` with its operator profiler on (its trace goes under ``folder``): the
    backend-neutral way to ask for profiling. Read the result with ``profiler(backend).stop_profiling()``
    (backends/base.py)."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}")
    try:
        make = PROFILING[name]
    except KeyError:
        raise InputError(f"backend {name!r} cannot profile operators; one that can: "
                         f"{'/'.join(PROFILING)} (ONNX Runtime)") from None
    return make(Path(folder))


# -- low-memory mode (runtime/components.py) ---------------------------------------------------------------------
def _ort_low_memory(options: Any) -> Any:
    from .ort import OrtOptions

    options = options or OrtOptions()
    if not isinstance(options, OrtOptions):
        return options
    # where the caller left them to the mode: no pre-packed second copy of the weights, and no stage's activations
    # held by the arena into the next
    return replace(options, disable_prepacking=options.disable_prepacking is not False,
                   shrink_arena_after_run=options.shrink_arena_after_run is not False)


# backend name -> that backend's options as low-memory mode opens it; a backend missing here opens as asked
LOW_MEMORY: dict[str, Callable[[Any], Any]] = {"cpu": _ort_low_memory, "cuda": _ort_low_memory,
                                               "tensorrt": _ort_low_memory}


def low_memory_options(name: str, options: Any) -> Any:
    """``options`` for backend ``name`` with low-memory mode's defaults filled in where the caller left them."""
    make = LOW_MEMORY.get(name)
    return options if make is None else make(options)
