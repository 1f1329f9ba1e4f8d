"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind the Backend protocol, with the optional
Profiling capability (ONNX Runtime's per-node profiler)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..bundle.manifest import Component
from ..bundle.schema import REOPTIMIZE_AT_LOAD
from ..config import check_choice
from ..errors import BackendError, BackendUnavailable, ConfigError, EdgediffError
from .validate import check_feeds

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """Session options. Defaults are ONNX Runtime's, except where a comment says why."""

    intra_op_num_threads: int = 0  # 0 = one per physical core
    inter_op_num_threads: int = 0
    graph_optimization_level: str = "all"  # one of OPT_LEVELS; "disable" for graphs optimized ahead of time
    enable_mem_arena: bool = True  # the CPU arena keeps peak activations allocated between calls
    # One CPU arena for every session of the process, growing by exactly what is asked (ORT's own grows in powers
    # of two, per session): the text encoder, UNet and VAE reuse one pool; see shared_cpu_arena(). With it, ORT's
    # memory pattern (one block for all of a call's activations, allocated from the second call on) is off: that
    # block comes on top of the pooled chunks. SD-1.5 512x512, optimized bundle: peak 4.95 GiB vs ORT defaults'
    # 7.04 GiB at the same step time (docs/memory.md).
    shared_arena: bool = True
    enable_mem_pattern: bool = False
    # Pre-packed weights are a second copy of many MatMul/Conv weights (SDXL UNet, INT8 storage: +0.7 GiB resident).
    # None: pack, except in low-memory mode (runtime/components.py), where the copy is the larger cost
    disable_prepacking: bool | None = None
    # Give the CPU arena's free chunks back after every run, so a stage's peak activations do not stay allocated
    # into the next stage (SDXL 1024x1024: the UNet's 2.2 GiB were still held while the VAE decoded). Each run then
    # allocates its activations afresh. None: on in low-memory mode only. Needs the arena (enable_mem_arena).
    shrink_arena_after_run: bool | None = None
    optimized_model_filepath: str | None = None  # write the optimized graph (edgediff optimize uses this)
    # Graphs saved by `edgediff optimize --target cpu` hold no CPU-specific layout (NCHWc blocks follow the vector
    # width). True re-runs level "all" on them at load: ~5 % faster SD-1.5 UNet steps, ~8 s more at start
    # (docs/engines.md), for long-running services. False opens them with optimizations off (session creation
    # ~0.1x). None: per component (REOPTIMIZE_AT_LOAD): the VAE graphs are re-optimized, whose pass takes well
    # under a second and whose convolutions run ~0.8x with NCHWc; the denoiser and text encoders open as saved.
    reoptimize_saved_graphs: bool | None = None
    # ORT's per-node profiler (backends.profiling_options turns it on): stop_profiling() sums it per operator type,
    # end_profiling() returns ORT's own JSON trace
    enable_profiling: bool = False
    profile_file_prefix: str = "edgediff_ort_profile"
    log_severity_level: int = 3  # errors only: ORT's warnings are not the user's business
    # TensorRT execution provider (ORT documents these as provider options)
    trt_fp16_enable: bool = False
    trt_engine_cache_path: str | None = None  # enables the engine cache when set
    trt_timing_cache_path: str | None = None  # enables the timing cache when set
    trt_profile_min_shapes: str | None = None  # "sample:2x4x64x64,encoder_hidden_states:2x77x768"
    trt_profile_opt_shapes: str | None = None
    trt_profile_max_shapes: str | None = None
    trt_cuda_graph_enable: bool = False
    cuda_device_id: int = 0
    extra_session_config: dict[str, str] = field(default_factory=dict)  # raw ORT session config entries
    # Initializer name -> array used instead of the graph's stored one (LoRA hot-swap, runtime/lora/), in the
    # initializer's dtype and shape; see _open_session for how they reach ONNX Runtime. Nothing is written.
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("OrtOptions", "graph_optimization_level", self.graph_optimization_level, OPT_LEVELS)
        for name in ("intra_op_num_threads", "inter_op_num_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"OrtOptions: {name}={v!r}; expected an integer >= 0 (0 = automatic)")

    def session_options(self):
        import onnxruntime as ort

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_num_threads
        so.inter_op_num_threads = self.inter_op_num_threads
        so.graph_optimization_level = levels[self.graph_optimization_level]
        so.enable_cpu_mem_arena = self.enable_mem_arena
        so.enable_mem_pattern = self.enable_mem_pattern
        so.log_severity_level = self.log_severity_level
        if self.optimized_model_filepath:
            so.optimized_model_filepath = self.optimized_model_filepath
        if self.enable_profiling:
            so.enable_profiling = True
            so.profile_file_prefix = self.profile_file_prefix
        if self.shared_arena and self.enable_mem_arena:
            shared_cpu_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        if self.disable_prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        for k, v in self.extra_session_config.items():
            so.add_session_config_entry(k, v)
        return so

    def providers(self, provider: str) -> list:
        cuda = ("CUDAExecutionProvider", {"device_id": self.cuda_device_id})
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        if provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        trt: dict[str, Any] = {"device_id": self.cuda_device_id, "trt_fp16_enable": self.trt_fp16_enable,
                               "trt_cuda_graph_enable": self.trt_cuda_graph_enable}
        if self.trt_engine_cache_path:
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=self.trt_engine_cache_path)
        if self.trt_timing_cache_path:
            trt.update(trt_timing_cache_enable=True, trt_timing_cache_path=self.trt_timing_cache_path)
        for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
            if getattr(self, key):
                trt[key] = getattr(self, key)
        return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


_SHARED_ARENA_LOCK = threading.Lock()
_shared_arena_registered = False


def shared_cpu_arena() -> None:
    """Register, once per process, a CPU arena in ONNX Runtime's environment that sessions opt into with
    ``session.use_env_allocators``: extend strategy kSameAsRequested (1), so the arena holds what the peak needs
    rather than the next power of two, and one pool serves all components instead of one each."""
    global _shared_arena_registered
    import onnxruntime as ort

    with _SHARED_ARENA_LOCK:
        if _shared_arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})
        ort.create_and_register_allocator(info, cfg)
        _shared_arena_registered = True


class OrtBackend:
    def __init__(self, model_path: Path, component: Component, provider: str = "cpu", options: OrtOptions | None = None):
        import onnxruntime as ort

        check_choice("backend", "provider", provider, PROVIDERS)
        options = options or OrtOptions()
        if component.optimized_for:
            # ONNX Runtime already optimized this graph for one provider (edgediff optimize --target); its fused
            # nodes may not exist elsewhere, and optimizing again only costs cold-start time.
            if component.optimized_for != provider:
                raise BackendUnavailable(
                    f"{component.name}: this bundle was optimized for ONNX Runtime's {component.optimized_for!r} "
                    f"backend and cannot run on {provider!r}; use --backend {component.optimized_for}, or optimize "
                    f"the original bundle with --target {provider}")
            again = options.reoptimize_saved_graphs
            if not (component.name.startswith(REOPTIMIZE_AT_LOAD) if again is None else again):
                options = replace(options, graph_optimization_level="disable")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise BackendUnavailable(
                f"backend {provider!r} needs ONNX Runtime's {PROVIDERS[provider]}, which this onnxruntime does not have "
                f"(it has {', '.join(available)}); install the GPU build: pip uninstall -y onnxruntime && "
                "pip install 'edgediff[gpu]'"
            )
        self.component = component.name
        self.inputs = component.inputs
        self.outputs = component.outputs
        try:
            self.session = _open_session(ort, model_path, options.session_options(), options.providers(provider),
                                         component.name, provider, options.initializers)
        except EdgediffError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f"{component.name}: ONNX Runtime could not load {model_path}: {_first_line(exc)}") from None
        self._output_names = [s.name for s in self.outputs]
        self._run_options = None
        if options.shrink_arena_after_run and options.enable_mem_arena:
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.component, self.inputs, feeds)
        try:
            outs = self.session.run(self._output_names, dict(feeds), self._run_options)
        except Exception as exc:
            raise BackendError(f"{self.component}: ONNX Runtime failed: {_first_line(exc)}") from None
        return dict(zip(self._output_names, outs))

    def end_profiling(self) -> str:
        """Stop ORT's profiler and return the path of its JSON trace ("" when it was not on)."""
        return self.session.end_profiling()

    def stop_profiling(self) -> dict[str, float]:
        """The Profiling capability (backends/base.py): seconds per operator type, from ORT's trace."""
        path = self.end_profiling()
        if not path:
            raise BackendError(f"{self.component}: the profiler was not on; open the backend with "
                               "edgediff.backends.profiling_options(...)")
        try:
            events = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BackendError(f"{self.component}: cannot read ONNX Runtime's profile {path}: {_first_line(exc)}") from None
        return op_seconds(events)

    def close(self) -> None:
        self.session = None


def _open_session(ort, model_path: Path, so, providers: list, component: str, provider: str,
                  initializers: Mapping[str, np.ndarray]):
    """An InferenceSession of ``model_path`` whose ``initializers`` replace the stored ones.

    Not SessionOptions.add_initializer: ONNX Runtime applies those after its graph optimizations, and at level
    "all" the CPU's NCHWc layout transform reorders Conv weights from the *stored* values (measured: wrong
    outputs). add_external_initializers replaces tensors the graph keeps in external data before any
    optimization (ORT's documented contract; it copies them in). A graph that keeps them inside the .onnx file
    gets the same replacement on an in-memory copy of its proto, created from bytes: the nodes are unchanged
    and no file is written."""
    if not initializers:
        return ort.InferenceSession(str(model_path), so, providers=providers)
    if provider == "tensorrt":
        # ORT's TensorRT provider would reuse cached engines built with the stored weights (its cache key is the
        # graph, not the weights): a swap could silently keep the old LoRA
        raise BackendUnavailable(f"{component}: changed weights (LoRA) are not supported on ONNX Runtime's TensorRT "
                                 "provider, whose engine cache ignores them; use --backend trt with engines built "
                                 "with edgediff build --refit, or --backend cuda")
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    stored = {t.name: t for t in model.graph.initializer}
    unknown = sorted(set(initializers) - set(stored))
    if unknown:
        raise BackendError(f"{component}: the graph has no initializer {unknown[0]!r} to replace")
    external = {n for n, t in stored.items() if t.data_location == TensorProto.EXTERNAL}
    if set(initializers) <= external:
        del model, stored
        names = list(initializers)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(initializers[n]))
                                             for n in names])
        return ort.InferenceSession(str(model_path), so, providers=providers)
    if external:
        raise BackendError(f"{component}: its graph keeps some weights inside model.onnx and some in external data; "
                           "changed weights need one or the other: re-export the bundle")
    for name, a in initializers.items():
        stored[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), name))
    data = model.SerializeToString()
    del model, stored  # one serialized copy at a time besides ONNX Runtime's own
    return ort.InferenceSession(data, so, providers=providers)


def op_seconds(events: list) -> dict[str, float]:
    """Total kernel time per operator type in an ORT trace (Chrome trace format: one "Node" event per kernel run,
    named ``<node>_kernel_time``, ``dur`` in microseconds, the operator type in ``args.op_name``)."""
    by_op: dict[str, float] = {}
    for ev in events:
        if isinstance(ev, dict) and ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = (ev.get("args") or {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev.get("dur", 0) / 1e6
    return by_op


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
