"""``edgediff build``: one TensorRT engine per component, from a strongly typed network.

Precision lives in the ONNX (fp32, fp16 casts, INT8/FP8 Q/DQ from ``edgediff quantize``): the network is created
with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, so no precision builder flag is set -- TensorRT 11 has none,
and 10.x honours the graph's types under this flag. APIs used exist in TensorRT 10.x and 11.x (docs/engines.md
cites them): Builder, create_network, OnnxParser.parse_from_file, create_builder_config,
builder_optimization_level, set_memory_pool_limit(WORKSPACE), create_optimization_profile/set_shape,
add_optimization_profile, create_timing_cache/set_timing_cache/get_timing_cache, BuilderFlag.REFIT /
VERSION_COMPATIBLE / EXCLUDE_LEAN_RUNTIME, build_serialized_network.

The engine cache it writes into, the device description and the rebuild hint come from the runtime
(``edgediff.backends.tensorrt``): what the builder stores is exactly what the backend verifies and loads.

Cannot run without an NVIDIA GPU: on this project's machines the GPU tests skip and everything around the builder
(profiles, cache keys, the cache) is tested on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edgediff.backends.tensorrt import device
from edgediff.backends.tensorrt.cache import (EngineCache, EngineKey, EngineNotBuilt, default_engine_dir, graph_digest,
                                              rebuild_command, write_durably)
from edgediff.bundle.reader import Bundle
from edgediff.bundle.schema import DEEPCACHE_COMPONENTS
from edgediff.errors import EngineError, EngineIncompatible, InputError

from .profiles import ShapeRange, profile_shapes

# what a generation runs, of what the bundle has (the SDXL refiner has only text_encoder_2; SD3 adds T5 as
# text_encoder_3 and a transformer for the UNet); img2img's vae_encoder on request (--components)
DEFAULT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder",
                      *DEEPCACHE_COMPONENTS)  # DeepCache's UNets when exported (--deepcache): cache_interval runs them


@dataclass(frozen=True)
class BuildOptions:
    shape_range: ShapeRange
    opt_level: int = 3  # TensorRT's default; 5 searches longest
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: Path | None = None  # shared across builds: rebuilding with a warm cache takes seconds
    refit: bool = False
    version_compatible: bool = False  # runs on later TensorRT versions (lean runtime excluded from the plan)

    def __post_init__(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise InputError(f"--opt-level {self.opt_level}; expected 0..5")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise InputError(f"--workspace {self.workspace_gb}; expected a size in GB > 0")

    def flags(self) -> dict:
        """What changes the plan (the timing cache only changes how long the build takes)."""
        return {"opt_level": self.opt_level, "workspace_gb": self.workspace_gb, "refit": self.refit,
                "version_compatible": self.version_compatible, "strongly_typed": True}


def engine_key(bundle: Bundle, name: str, *, tensorrt: str, gpu: str, compute_capability: str,
               options: BuildOptions) -> EngineKey:
    return EngineKey(component=name, onnx_sha256=graph_digest(bundle.component(name)), tensorrt=tensorrt, gpu=gpu,
                     compute_capability=compute_capability, profile=options.shape_range.describe(),
                     flags=options.flags())


def default_components(bundle: Bundle) -> list[str]:
    return [n for n in DEFAULT_COMPONENTS if bundle.has(n)]


def build_engines(bundle_path: str | Path, options: BuildOptions, *, engine_dir: str | Path | None = None,
                  components: Sequence[str] | None = None, force: bool = False,
                  progress: Callable[[str], None] = lambda msg: None) -> dict[str, Path]:
    bundle = Bundle.open(bundle_path)
    names = list(components or default_components(bundle))
    for n in names:
        comp = bundle.component(n)
        if comp.optimized_for:
            raise EngineError(f"{n} was optimized for ONNX Runtime {comp.optimized_for!r} (fused ORT-only ops); build "
                              "engines from the exported bundle or one made with edgediff optimize --target tensorrt")
    # every component's profile before TensorRT loads: a bad request is refused on any machine, before any build
    profiles = {n: profile_shapes(bundle.component(n), bundle.manifest, options.shape_range) for n in names}
    trt = device.import_tensorrt()
    gpu = device.gpu()
    cache = EngineCache(engine_dir or default_engine_dir(bundle.digest))
    out: dict[str, Path] = {}
    for n in names:
        key = engine_key(bundle, n, tensorrt=trt.__version__, gpu=gpu.name,
                         compute_capability=gpu.compute_capability, options=options)
        with cache.lock(n):  # a second builder waits here, then finds the engine built
            if not force:
                try:
                    cache.load(key, rebuild_command(bundle.root, engine_dir))
                    progress(f"{n}: cached {cache.plan_path(key).name}")
                    out[n] = cache.plan_path(key)
                    continue
                except (EngineNotBuilt, EngineIncompatible):
                    pass
            shapes = profiles[n]
            progress(f"{n}: building ({bundle.component(n).precision}, profile {options.shape_range.describe()})")
            t0 = time.perf_counter()
            plan = _build_one(trt, n, bundle.model_path(n), shapes, options)
            seconds = time.perf_counter() - t0
            out[n] = cache.store(key, plan, build_seconds=seconds)
            progress(f"{n}: built in {seconds:.1f} s, {len(plan) / 2**20:.1f} MiB -> {out[n]}")
    return out


def _build_one(trt, name: str, onnx_path: Path, shapes: dict, options: BuildOptions) -> bytes:
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the graph
        first = parser.get_error(0).desc() if parser.num_errors else "unknown error"
        raise EngineError(f"{name}: TensorRT cannot parse {onnx_path}: {first}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in shapes.items():
        profile.set_shape(tensor, lo, opt, hi)
    config.add_optimization_profile(profile)
    if options.timing_cache is not None:
        blob = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        if logger.out_of_memory:
            raise EngineError(f"{name}: the TensorRT builder ran out of GPU memory; fix the shapes "
                              "(--static 1x512x512), lower the profile's max (--profile height=256:512:512,...), or "
                              "cap the workspace (--workspace 2)")
        raise EngineError(f"{name}: TensorRT could not build the engine: {logger.last_error or 'no message'}")
    if options.timing_cache is not None:
        write_durably(Path(options.timing_cache), bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _Logger(trt):
    """A TensorRT logger that keeps errors (to name the failure) and forwards warnings to stderr."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = ""
            self.out_of_memory = False

        def log(self, severity, msg):
            import sys

            if severity <= trt.ILogger.Severity.ERROR:
                self.last_error = msg.splitlines()[0] if msg else ""
                low = msg.lower()
                if "out of memory" in low or "outofmemory" in low or "cudaerrormemoryallocation" in low:
                    self.out_of_memory = True
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return Logger()
