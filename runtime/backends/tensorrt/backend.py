"""Native TensorRT backend (``backend="trt"``): engines from ``edgediff build``, GPU memory through cuda-python.

Engine lifecycle: the plan is read from the engine cache of the bundle it serves (the backend is given the Bundle:
its digest names the default cache folder, its root goes into the rebuild hint) and verified against its meta
(TensorRT version, GPU, sha256) -> deserialized with host code disallowed -> an execution context with user-managed
scratch memory, all engines of the process sharing one device scratch buffer sized to the largest -> per-shape
device I/O buffers, grown when a larger shape comes -> enqueue on one CUDA stream. Only the numpy arrays the loop
needs cross to and from the host (latents and embeddings: tens of KB per step at 512x512).

Everything this needs to load and verify a plan (cache layout and key, device description, rebuild hint) lives beside
it in this package; engines/tensorrt/ (the builder) imports it from here, never the other way round.

Concurrency contract: engines on one device share the scratch buffer, so their calls are serialized by a
per-process lock; a Pipeline may still be called from several threads (calls queue). For parallel generation on
one GPU, run one process per stream.

CUDA graphs (``TrtOptions(cuda_graph=True)``): the denoiser's enqueue is captured on its first call and replayed
afterwards; only for static engines (``edgediff build --static``), since a graph replays fixed shapes and
addresses -- a dynamic engine is refused with that reason.

No operator profiler: this backend does not implement the optional ``Profiling`` capability (backends/base.py).

Cannot run without an NVIDIA GPU and TensorRT: GPU tests are marked ``gpu`` and skip where there is none.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ...bundle.manifest import Component
from ...errors import EngineError, EngineIncompatible
from ..validate import check_feeds
from . import device
from .cache import EngineCache, default_engine_dir, graph_digest, rebuild_command

if TYPE_CHECKING:
    from ...bundle.reader import Bundle

_DEVICE_LOCK = threading.Lock()


@dataclass(frozen=True)
class TrtOptions:
    engine_dir: str | None = None  # default: ~/.cache/edgediff/engines/<bundle digest>
    cuda_graph: bool = False
    device: int = 0


class _Scratch:
    """One device scratch buffer per process, grown to the largest engine's need."""

    ptr = 0
    size = 0
    generation = 0  # bumped on every reallocation: CUDA graphs captured with the old address must be re-captured

    @classmethod
    def ensure(cls, rt, check, size: int) -> int:
        if size > cls.size:
            if cls.ptr:
                check(rt.cudaFree(cls.ptr), "cudaFree")
            cls.ptr, cls.size = check(rt.cudaMalloc(size), "cudaMalloc"), size
            cls.generation += 1
        return cls.ptr


class TrtBackend:
    def __init__(self, bundle: "Bundle", component: Component, options: TrtOptions | None = None):
        options = options or TrtOptions()
        trt = device.import_tensorrt()
        self._rt, self._check = device.cudart(), device.check
        gpu = device.gpu(options.device)
        engine_dir = Path(options.engine_dir) if options.engine_dir else default_engine_dir(bundle.digest)
        rebuild = rebuild_command(bundle.root, Path(options.engine_dir) if options.engine_dir else None)
        plan = EngineCache(engine_dir).select(component.name, graph_digest(component), trt.__version__, gpu.name,
                                              gpu.compute_capability, rebuild)
        self.component, self.inputs, self.outputs = component.name, component.inputs, component.outputs
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runtime.engine_host_code_allowed = False  # a plan must not bring its own code (lean runtime)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineIncompatible(f"{component.name}: TensorRT {trt.__version__} refused the cached plan; "
                                     f"rebuild it: {rebuild}")
        self._context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self._scratch_size = int(self._engine.device_memory_size_v2)
        self._stream = self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")
        self._nptype = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in self._names()}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._graph = None
        self._graph_generation = -1
        self._cuda_graph = options.cuda_graph
        if options.cuda_graph and any(-1 in tuple(self._engine.get_tensor_shape(n)) for n in self._names()):
            raise EngineError(f"{component.name}: CUDA graphs replay fixed shapes and addresses; this engine has "
                              "dynamic shapes. Build it static (edgediff build --static 1x512x512) or turn graphs off")

    def _names(self) -> list[str]:
        return [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                self._check(self._rt.cudaFree(ptr), "cudaFree")
            ptr = self._check(self._rt.cudaMalloc(max(nbytes, 256)), "cudaMalloc")
            self._buffers[name] = (ptr, nbytes)
            self._graph = None  # addresses changed: a captured graph is stale
        return ptr

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.component, self.inputs, feeds)
        rt, check, stream = self._rt, self._check, self._stream
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with _DEVICE_LOCK:
            ctx = self._context
            ctx.set_device_memory(_Scratch.ensure(rt, check, self._scratch_size), self._scratch_size)
            hosts = {}
            for spec in self.inputs:
                a = np.ascontiguousarray(feeds[spec.name], dtype=self._nptype[spec.name])
                hosts[spec.name] = a
                if not ctx.set_input_shape(spec.name, a.shape):
                    raise EngineError(f"{self.component}.{spec.name}: shape {a.shape} is outside the engine's "
                                      "profile; rebuild with a wider --profile")
                ptr = self._buffer(spec.name, a.nbytes)
                check(rt.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, h2d, stream), "cudaMemcpyAsync")
                ctx.set_tensor_address(spec.name, ptr)
            outs = {}
            for spec in self.outputs:
                out = np.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=self._nptype[spec.name])
                ctx.set_tensor_address(spec.name, self._buffer(spec.name, out.nbytes))
                outs[spec.name] = out
            self._enqueue(ctx)
            for name, out in outs.items():
                check(rt.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, stream),
                      "cudaMemcpyAsync")
            check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return outs

    def _enqueue(self, ctx) -> None:
        rt, check, stream = self._rt, self._check, self._stream
        if not self._cuda_graph:
            if not ctx.execute_async_v3(stream):
                raise EngineError(f"{self.component}: TensorRT enqueue failed")
            return
        if self._graph is not None and self._graph_generation != _Scratch.generation:
            self._graph = None  # the shared scratch moved since capture
        if self._graph is None:
            self._graph_generation = _Scratch.generation
            if not ctx.execute_async_v3(stream):  # once outside capture: TensorRT finishes lazy set-up here
                raise EngineError(f"{self.component}: TensorRT enqueue failed")
            check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture")
            ctx.execute_async_v3(stream)
            graph = check(rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            self._graph = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        check(rt.cudaGraphLaunch(self._graph, stream), "cudaGraphLaunch")

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._rt.cudaFree(ptr)
        self._buffers.clear()
        self._context = self._engine = None
