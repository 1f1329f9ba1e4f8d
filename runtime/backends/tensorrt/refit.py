"""LoRA on TensorRT without rebuilding: refit an engine built with ``edgediff build --refit`` (TensorRT 10's
``trt.Refitter``; the ONNX parser names each refittable weight after its ONNX initializer, so the names LoRA
hot-swap computes, runtime/lora/apply.py, are the refitter's names).

Every refit sets weights computed from the *base* weights the bundle stores: a weight the new LoRAs change gets
base + delta, and a weight only the previous refit changed gets its base value back. Nothing is ever added to
what the engine holds, so A -> B -> A leaves exactly A's weights in the engine (TensorRT #3628 is what happens when
a delta is applied to the previous LoRA's weights). Weights TensorRT folded together with a changed one at build
time (``get_missing_weights``: a conv's bias, say) are given their base values too.

The weight bookkeeping (``refit_plan``, ``complete_plan``) is plain numpy, tested on CPU; ``EngineRefit`` calls
TensorRT and runs only where it is installed (GPU tests, marked ``gpu``).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

import numpy as np

from ...errors import EngineError

BaseReader = Callable[[str], np.ndarray]  # initializer name -> its stored (base) values, ONNX layout


def refit_plan(new: Mapping[str, np.ndarray], previous: set[str] | frozenset[str],
               base: BaseReader) -> dict[str, np.ndarray]:
    """Every weight one refit must set: ``new`` (fused from the base) plus the base values of the weights the
    previous refit changed and ``new`` does not."""
    plan = dict(new)
    for name in sorted(set(previous) - set(new)):
        plan[name] = base(name)
    return plan


def complete_plan(plan: dict[str, np.ndarray], missing: list[str], base: BaseReader) -> list[str]:
    """Add the base values of the weights TensorRT still asks for (``missing``, from ``get_missing_weights``) to
    ``plan``; return the names added. A missing name already in the plan means TensorRT refused it."""
    added = []
    for name in missing:
        if name in plan:
            raise EngineError(f"TensorRT still needs weight {name!r} after it was set; the engine does not match "
                              "this graph: rebuild it (edgediff build --refit --force)")
        plan[name] = base(name)
        added.append(name)
    return added


class EngineRefit:
    """Refits of one deserialized engine, in place. ``apply(weights)`` makes the engine hold the base weights
    with ``weights`` (initializer name -> fused values) in place of their stored ones, whatever was applied
    before. Not thread-safe: the caller serializes it with the engine's executions."""

    def __init__(self, trt: Any, engine: Any, base: BaseReader, *, component: str, rebuild: str):
        if not engine.refittable:
            raise EngineError(f"{component}: this engine was built without --refit, so its weights cannot change; "
                              f"rebuild it refittable: {rebuild} --refit")
        self._trt, self._engine, self._base = trt, engine, base
        self._component, self._rebuild = component, rebuild
        self._changed: frozenset[str] = frozenset()
        self._logger = trt.Logger(trt.Logger.WARNING)

    @property
    def changed(self) -> frozenset[str]:
        """The weights that now differ from the base."""
        return self._changed

    def apply(self, weights: Mapping[str, np.ndarray]) -> None:
        trt = self._trt
        plan = refit_plan(weights, self._changed, self._base)
        if not plan:
            return
        refitter = trt.Refitter(self._engine, self._logger)
        refittable = set(refitter.get_all_weights())
        unknown = sorted(n for n in plan if n not in refittable)
        if unknown:
            raise EngineError(f"{self._component}: the engine has no refittable weight {unknown[0]!r}; it was built "
                              f"from another graph or without --refit: {self._rebuild} --refit")
        keep: list[np.ndarray] = []  # TensorRT reads the host buffers when refit_cuda_engine runs
        pending = list(plan)
        while pending:
            for name in pending:
                keep.append(self._set(refitter, name, plan[name]))
            pending = complete_plan(plan, list(refitter.get_missing_weights()), self._base)
        if not refitter.refit_cuda_engine():
            # the engine may now hold a mix of old and new weights: it must not be used again
            self._changed = frozenset(refittable)
            raise EngineError(f"{self._component}: TensorRT could not refit the engine; reload the pipeline")
        self._changed = frozenset(weights)
        del keep

    def _set(self, refitter, name: str, values: np.ndarray) -> np.ndarray:
        trt = self._trt
        proto = refitter.get_weights_prototype(name)  # the engine's dtype and element count for this weight
        dtype = np.dtype(trt.nptype(proto.dtype))
        a = np.ascontiguousarray(values, dtype=dtype)
        if a.size != proto.size:
            raise EngineError(f"{self._component}: weight {name!r} has {a.size} values, the engine {proto.size}; "
                              f"the engine was built from another graph: {self._rebuild}")
        if not refitter.set_named_weights(name, trt.Weights(a), trt.TensorLocation.HOST):
            raise EngineError(f"{self._component}: TensorRT refused the new values of {name!r} ({a.dtype} "
                              f"{a.shape}); rebuild the engine: {self._rebuild} --refit")
        return a


_REFITS_LOCK = threading.Lock()


def refit_backend(backend: Any, weights: Mapping[str, np.ndarray], base: BaseReader, *, rebuild: str) -> None:
    """Refit a native TensorRT backend's engine (runtime/backends/tensorrt/backend.py) to the base weights plus
    ``weights``, serialized with every engine execution of the process (the backend's device lock)."""
    from . import device
    from .backend import _DEVICE_LOCK

    with _REFITS_LOCK:
        refit = getattr(backend, "_edgediff_refit", None)
        if refit is None:
            refit = EngineRefit(device.import_tensorrt(), backend._engine, base, component=backend.component,
                                rebuild=rebuild)
            backend._edgediff_refit = refit
    with _DEVICE_LOCK:  # no enqueue may run while the weights change
        refit.apply(weights)
        backend._graph = None  # a CUDA graph captured before the refit is re-captured on the next call
