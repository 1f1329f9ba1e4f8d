"""The one seam between the pipeline and whatever executes a graph, and the optional capabilities a backend may add."""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from ..bundle.manifest import TensorSpec
from ..errors import InputError


class Backend(Protocol):
    component: str  # bundle component name, for error messages
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@runtime_checkable
class Profiling(Protocol):
    """Optional capability: per-operator timing. A backend opened with the options ``profiling_options(name,
    folder)`` gives (backends/__init__.py) records every operator it runs; ``stop_profiling`` ends the recording and
    returns the total seconds per operator type over every run since it was opened, e.g. ``{"Conv": 1.2,
    "MatMul": 0.8}``. ONNX Runtime's backends have it; the native TensorRT backend does not."""

    def stop_profiling(self) -> dict[str, float]: ...


def supports_profiling(backend: object) -> bool:
    return isinstance(backend, Profiling)


def profiler(backend: Backend) -> Profiling:
    """``backend`` as a Profiling one, or InputError naming the component and the backends that can profile."""
    if not supports_profiling(backend):
        name = getattr(backend, "component", "?")
        raise InputError(f"{name}: {type(backend).__name__} cannot profile operators; use an ONNX Runtime backend "
                         "(cpu/cuda/tensorrt)")
    return backend  # type: ignore[return-value]
