"""Opening a component with changed weights (initializer name -> fused values), per backend kind:

- ONNX Runtime (``cpu``, ``cuda``): a new session with those initializers replaced before ORT optimizes the graph
  (OrtOptions.initializers; runtime/backends/ort.py: add_external_initializers for external-data graphs, an
  in-memory copy of the graph for embedded ones — not add_initializer, which ORT applies after its layout passes):
  no file written, the bundle's tensors never modified.
- native TensorRT (``trt``): the cached refittable engine, refitted from the base weights plus the LoRA
  (backends/tensorrt/refit.py).

Any other backend cannot take them: one line.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..backends import open_backend
from ..backends.base import Backend
from ..bundle.manifest import Component
from ..errors import BackendUnavailable, InputError

if TYPE_CHECKING:
    from ..bundle.reader import Bundle

ORT_BACKENDS = ("cpu", "cuda", "tensorrt")  # ONNX Runtime's providers (the last one refuses changed weights)


def open_with_weights(name: str, bundle: "Bundle", component: Component, model_path: Path, options: Any,
                      weights: Mapping[str, np.ndarray]) -> Backend:
    if name in ORT_BACKENDS:
        from ..backends.ort import OrtOptions

        if options is None:
            options = OrtOptions()
        if not isinstance(options, OrtOptions):
            raise InputError(f"backend {name!r} takes OrtOptions, not {type(options).__name__}")
        return open_backend(name, bundle, component, model_path, replace(options, initializers=weights))
    if name == "trt":
        from ..backends.tensorrt.cache import rebuild_command
        from ..backends.tensorrt.refit import refit_backend
        from .onnx_weights import GraphWeights

        backend = open_backend(name, bundle, component, model_path, options)
        engine_dir = getattr(options, "engine_dir", None)
        try:
            refit_backend(backend, weights, GraphWeights(model_path).read,
                          rebuild=rebuild_command(bundle.root, Path(engine_dir) if engine_dir else None))
        except BaseException:
            backend.close()
            raise
        return backend
    raise BackendUnavailable(f"backend {name!r} cannot change a graph's weights (LoRA); use cpu/cuda (ONNX Runtime) "
                             "or trt (refittable TensorRT engines)")
