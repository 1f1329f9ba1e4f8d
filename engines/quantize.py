"""``edgediff quantize``: precision lives in the ONNX (TensorRT 10/11 strongly typed networks, ONNX Runtime).

Modes (one per call), all with fp32 graph inputs/outputs so the runtime's loop does not change:
- ``fp16``: mixed precision. Activation peaks are measured on real inputs (``probe.capture``) and every node whose
  output comes within FP16_HEADROOM of fp16's largest finite value (65504) stays fp32 -- the SDXL VAE is the known
  case of a silent black image otherwise. The runtime's finite-value guard still checks every decode.
- ``int8``: static post-training quantization to explicit Q/DQ: signed INT8, symmetric activations (per tensor)
  and weights (per output channel), float biases, calibrated on the denoiser inputs of real pipeline runs across
  every timestep of the target step count. The layout TensorRT's explicit quantization expects (``qdq_rules``).
- ``int8-weights``: ONNX Runtime dynamic quantization (weights INT8 per channel, activations quantized at run
  time). Smaller files; on CPUs without VNNI it is slower than fp32 (docs/engines.md) -- a size option.
- ``fp8``: E4M3 Q/DQ, for Ada/Hopper TensorRT. ONNX Runtime's CPU provider cannot run FP8 matrix products, so it
  is produced and structurally validated here (``qdq_rules``), and parity is measured where it can run.
- ``int4-weights``: block-wise (32) symmetric weight-only INT4 of the MatMul weights as blocked
  DequantizeLinear (opset 21), for memory-bound Jetsons; convolutions stay in their precision.
- ``int8-storage``: the large Conv/MatMul/Gemm weights stored INT8 (symmetric, per output channel) and
  dequantized to fp32 as each node runs; fp32 arithmetic (``weight_storage``). For low memory: applies to
  optimized bundles too (optimize first, then this), which keep their fused graphs.
"""
from __future__ import annotations

import io
import logging
import shutil
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgediff.bundle.reader import Bundle
from edgediff.bundle.schema import DEEPCACHE_COMPONENTS
from edgediff.errors import EngineError, InputError

from .derive import Result, begin, derive
from .graphs import (EXTERNAL_DATA_NAME, EXTERNAL_DATA_THRESHOLD, adopt_external_data, load_model,
                     load_model_qparams, weights_bytes)
from .isolate import run_isolated
from .probe import Captured, capture, read_prompts, vae_encoder_feeds
from . import qdq_rules
from .attention import attention_projections
from .conditioning import conditioning_only
from .scratch import temp_files_in
from .weight_storage import MIN_ELEMENTS, store_weights_int8

MODES = ("fp16", "int8", "int8-weights", "fp8", "int4-weights", "int8-storage")
PRECISION = {"fp16": "mixed-fp16", "int8": "int8-qdq", "int8-weights": "int8-weights", "fp8": "fp8-qdq",
             "int4-weights": "int4-weights", "int8-storage": "int8-storage"}
# the components a mode applies to by default, those of them a bundle has (SDXL: both text encoders for --fp16;
# the denoiser is the UNet or, for SD3/FLUX, the transformer)
DENOISERS = ("unet", "transformer")
DEFAULT_COMPONENTS = {"fp16": ("text_encoder", "text_encoder_2", *DENOISERS, "vae_decoder", "vae_encoder"),
                      "int8": DENOISERS, "int8-weights": DENOISERS, "fp8": DENOISERS, "int4-weights": DENOISERS,
                      "int8-storage": DENOISERS}
QUANT_TARGETS = ("tensorrt", "cpu")
STATIC = ("int8", "fp8")  # calibrated Q/DQ: quantized in a child process (_static_graph)
OP_TYPES = ("Conv", "MatMul", "Gemm")
# modes that rewrite weights only and keep every node: they apply to graphs ONNX Runtime has already fused
AFTER_OPTIMIZE = ("int8-storage",)
FP16_MAX = 65504.0
FP16_HEADROOM = 4.0  # keep a node fp32 when its calibrated |output| exceeds 65504 / 4: unseen prompts go higher
PARITY_PROMPT = "a photo of a red apple on a wooden table"
# Generic calibration prompts (varied subjects, styles, compositions) when --calib-prompts is not given.
CALIB_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a kitchen table, morning light",
    "a futuristic city skyline at night with neon signs",
    "a small red circle in the top left corner on a white background",
    "an oil painting of a stormy sea with a sailing ship",
    "a cute corgi puppy sitting in the grass",
    "a mountain landscape with a lake and pine trees",
    "a pencil sketch of a cat sleeping on a windowsill",
    "a plate of sushi on a black slate, top view",
    "a vintage car parked on a cobblestone street",
    "an abstract geometric pattern in blue and orange",
    "a snowy forest path under a full moon",
    "a medieval castle on a hill, fantasy art",
    "a macro photo of a dewdrop on a green leaf",
)


def quantize_bundle(src: str | Path, out: str | Path, *, mode: str, components: Sequence[str] | None = None,
                    calib_prompts: Sequence[str] | str | Path | None = None, calib_size: int | None = None,
                    steps: int | None = None, height: int | None = None, width: int | None = None,
                    overwrite: bool = False, tolerance: float | None = None, target: str = "tensorrt",
                    progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Write a quantized copy of the bundle ``src`` to ``out``. Calibration runs the bundle's own pipeline on
    ``calib_size`` prompts (from ``calib_prompts``: a file, a list, or the generic set) at ``steps`` steps.
    ``target`` (``int8`` only): ``tensorrt`` quantizes every convolution and weight MatMul; ``cpu`` leaves the
    attention projections float so that ``optimize --target cpu`` can still fuse attention."""
    if mode not in MODES:
        raise InputError(f"unknown precision {mode!r}; expected one of {list(MODES)}")
    if target not in QUANT_TARGETS:
        raise InputError(f"--target {target!r}; expected one of {list(QUANT_TARGETS)}")
    if target != "tensorrt" and mode != "int8":
        raise InputError(f"--target {target} applies to --int8 only")
    parent = begin(src, out, overwrite=overwrite, tolerance=tolerance)
    m = parent.manifest
    names = list(components or DEFAULT_COMPONENTS[mode])
    if components is None:
        # DeepCache's full and shallow UNets (export --deepcache) run in the unet's place on a cached request: they
        # follow its precision, or DeepCache would run float graphs beside a quantized unet
        names = [n for n in names if n in m.components]
        names += [n for n in DEEPCACHE_COMPONENTS if n in m.components and "unet" in names]
    if not names:  # a bundle of none of the default components: say so rather than write an unchanged copy
        raise InputError(f"--{mode}: this bundle has none of the components it applies to by default "
                         f"({', '.join(DEFAULT_COMPONENTS[mode])}); name them with --components (it has "
                         f"{', '.join(sorted(m.components))})")
    for n in names:
        if n not in m.components:
            raise InputError(f"--components: {n!r} is not in this bundle; it has {sorted(m.components)}")
        comp = m.components[n]
        if comp.precision != "fp32":
            raise EngineError(f"{parent.root}: {n} is already {comp.precision}; quantize the fp32 bundle it came from")
        if comp.optimized_for and mode not in AFTER_OPTIMIZE:
            raise EngineError(f"{parent.root}: {n} was optimized for {comp.optimized_for!r} (fused ONNX Runtime ops); "
                              "quantize the exported bundle, then optimize the result")
    if isinstance(calib_prompts, (str, Path)):
        prompts = read_prompts(calib_prompts)
    else:
        prompts = list(calib_prompts) if calib_prompts is not None else list(CALIB_PROMPTS)
        if not prompts:
            raise InputError("no calibration prompts given")
    if calib_size is not None:
        if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
            raise InputError(f"--calib-size {calib_size!r}; expected an integer >= 1")
        prompts = (prompts * (calib_size // len(prompts) + 1))[:calib_size]
    steps = parent.default_steps if steps is None else steps  # the bundle's recommended count by default
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps {steps!r}; expected an integer >= 1")

    needs_calib = mode in ("fp16", "int8", "fp8")
    cached = any(n in DEEPCACHE_COMPONENTS for n in names)  # the captures then run DeepCache too (probe.capture)
    calib = Captured()
    if needs_calib:
        progress(f"calibration: {len(prompts)} prompt(s) x {steps} steps through the fp32 pipeline")
        # each capture in its own process: the fp32 pipeline it opens is gone before the next step loads a graph
        calib = run_isolated(capture, parent.root, prompts, steps=steps, height=height, width=width, seed=1000,
                             deepcache=cached, what="calibration: running the fp32 pipeline")
    progress("parity inputs: 1 held-out prompt")
    held = run_isolated(capture, parent.root, [PARITY_PROMPT], steps=min(steps, 4), height=height, width=width,
                        seed=7, deepcache=cached, what="parity inputs: running the fp32 pipeline")
    parity_feeds = {n: held.feeds.get(n, []) for n in names}
    if "vae_encoder" in names:
        parity_feeds["vae_encoder"] = vae_encoder_feeds(held)
        calib.feeds["vae_encoder"] = vae_encoder_feeds(calib)

    def transform(name: str, graph: Path, bundle: Bundle, work: Path):
        feeds = calib.feeds.get(name, [])
        if needs_calib and not feeds:
            raise EngineError(f"internal: no calibration inputs captured for {name}")
        optimized_for = m.components[name].optimized_for  # only AFTER_OPTIMIZE modes get here with one

        def result(precision: str) -> Result:
            return Result(precision=precision, optimized_for=optimized_for,
                          provider="cuda" if optimized_for == "cuda" else "cpu")

        if mode in STATIC:
            # three child processes, each returning files: ONNX Runtime's clean-up, the calibration session and the
            # quantizer's copy of the weights (SDXL UNet, 10.3 GB: 9.0, 10.3 and 12.2 GiB alone; the first two in one
            # process peaked at 20.6 GiB, all three at 24 GiB, killed), and the result is never loaded here
            progress(f"{name}: calibrating on {len(feeds)} captured input(s)")
            if mode == "int8" and target == "cpu":
                progress(f"{name}: attention projections stay float (--target cpu)")
            fp8 = mode == "fp8"
            clean = run_isolated(_cleaned, graph, work, what=f"{name}: cleaning up the graph for --{mode}")
            # FP8 is calibrated by ONNX Runtime's Distribution method inside the quantizer (no range cache)
            cache = None if fp8 else run_isolated(_calibrated, clean, feeds, work, what=f"{name}: calibrating")
            done = run_isolated(_static_graph, clean, feeds, name, work, fp8=fp8, cache=cache,
                                attention_float=mode == "int8" and target == "cpu",
                                what=f"{name}: quantize --{mode}")
            return done, result(PRECISION[mode])
        # onnxruntime.quantization logs advice to the root logger, prints progress and makes temporary folders
        with _quiet_quantizer(), temp_files_in(work):
            model, precision = _QUANTIZERS[mode](graph, feeds, name, progress, work)
        if mode == "int8-storage":
            _check_qdq(model, name, mode)
        return model, result(precision)

    extra = f" --calib-size {len(prompts)} --steps {steps}" if needs_calib else ""
    extra += f" --target {target}" if target != "tensorrt" else ""
    return derive(parent, out, step=f"quantize --{mode} --components {','.join(names)}{extra}", transform=transform,
                  components=names, parity_feeds=parity_feeds, overwrite=overwrite, tolerance=tolerance, progress=progress)


@contextmanager
def _quiet_quantizer():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            yield
    finally:
        root.setLevel(level)


# -- the quantizers: (parent graph, calibration feeds, component, progress, scratch) -> (ModelProto, precision)
class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over captured feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not used by MinMax; present for the protocol
        pass


def _cleaned(graph: Path, d: Path) -> Path:
    """The graph after ONNX Runtime's portable (basic) clean-up: constants folded, so weights are initializers."""
    from .optimize import _ort_offline

    return _ort_offline(graph, "tensorrt", graph.parent.name, d / "clean" / "model.onnx")


def _has_external_data(graph: Path) -> bool:
    return (Path(graph).parent / EXTERNAL_DATA_NAME).exists()


def _calibrated(clean: Path, feeds, work: Path) -> Path | None:
    """The INT8 calibration cache of ``clean`` (the activation ranges, engines.calibrate), or None with an ONNX Runtime
    that reads no calibration cache (its quantizer then calibrates itself). Runs in a child process, from
    quantize_bundle."""
    from . import calibrate

    if not calibrate.cache_supported():
        return None
    with temp_files_in(work):
        return calibrate.write_cache(calibrate.absmax(clean, feeds, OP_TYPES, work), work / "calibration.json")


def _static_graph(clean: Path, feeds, name: str, work: Path, *, fp8: bool, cache: Path | None,
                  attention_float: bool = False) -> Path:
    """Static Q/DQ quantization of ``clean`` (from _calibrated), saved under ``work``; returns the saved graph's path.
    Runs in a child process, from quantize_bundle."""
    with _quiet_quantizer(), temp_files_in(work):
        out = _static(clean, feeds, name, work, fp8=fp8, cache=cache, attention_float=attention_float)
        _check_qdq(load_model_qparams(out), name, "fp8" if fp8 else "int8")
    return out


def _check_qdq(model, name: str, mode: str) -> None:
    problems = qdq_rules.violations(model, "fp8" if mode == "fp8" else "int8")
    if problems:
        raise EngineError(f"{name}: the quantized graph breaks TensorRT's Q/DQ rules: {problems[0]}")


def _static(clean: Path, feeds, name: str, work: Path, *, fp8: bool, cache: Path | None,
            attention_float: bool) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    big = _has_external_data(clean)
    out = work / "q" / "model.onnx"
    out.parent.mkdir()
    # Convolutions and weight MatMuls/Gemms only: the activation x activation MatMuls of attention (QK^T,
    # softmax x V) lose most under per-tensor INT8 (softmax outputs span 1e-6..1) and are a small share of time.
    model = load_model(clean, weights=False)  # names, nodes, shapes: cheap even for a 10 GB UNet
    inits = {t.name for t in model.graph.initializer}
    nodes = [n.name for n in model.graph.node
             if n.op_type == "Conv" or (n.op_type in ("MatMul", "Gemm") and n.input[1] in inits)]
    # The first and last convolutions (conv_in, conv_out) stay float, as is usual for INT8 CNNs: conv_out
    # alone is the largest single error source measured on the UNet (docs/engines.md), for ~1 % of its time.
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]  # nodes are topologically sorted
    nodes = [n for n in nodes if not convs or n not in (convs[0], convs[-1])]
    # Layers fed only by the timestep or the text (engines.conditioning) run on a few vectors and shift the
    # whole image when wrong: they stay float too.
    conditioning = conditioning_only(model)
    nodes = [n for n in nodes if n not in conditioning]
    if attention_float:  # ONNX Runtime's CPU attention fusion needs float projections (engines.attention)
        projections = attention_projections(model)
        nodes = [n for n in nodes if n not in projections]
    del model
    # INT8: the ranges engines.calibrate computed (one copy of the weights in memory, not four), read by the
    # quantizer as its calibration cache -- the same ranges ONNX Runtime's calibrator computes
    source = dict(calibration_data_reader=None, calibration_cache_path=str(cache)) if cache is not None \
        else dict(calibration_data_reader=_Reader(feeds))
    try:
        quantize_static(
            str(clean), str(out), **source, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OP_TYPES), nodes_to_quantize=nodes, per_channel=not fp8,
            reduce_range=False,
            activation_type=qtype, weight_type=qtype, use_external_data_format=big,
            calibrate_method=CalibrationMethod.Distribution if fp8 else CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True, "WeightSymmetric": True,  # zero-points 0, as TensorRT requires
                "QuantizeBias": False,  # TensorRT fuses float biases; INT32 bias DQ is not portable
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # K x N weight: one scale per output N
                "CalibTensorRangeSymmetric": True,
            })
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{name}: ONNX Runtime's quantizer failed: {text}") from None
    shutil.rmtree(clean.parent)  # one fp32 copy less on disk before the bundle is written
    return adopt_external_data(out)


def _int8_weights(graph: Path, feeds, name: str, progress, work: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    clean = _cleaned(graph, work)
    out = work / "q.onnx"
    big = _has_external_data(clean)
    quantize_dynamic(str(clean), str(out), op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=big,
                     extra_options={"MatMulConstBOnly": True})  # activation x activation MatMuls stay float
    return load_model(out), PRECISION["int8-weights"]


def _int4_weights(graph: Path, feeds, name: str, progress, work: Path):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    clean = _cleaned(graph, work)
    q = MatMulNBitsQuantizer(load_model(clean), bits=4, block_size=32, is_symmetric=True,
                             quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model, PRECISION["int4-weights"]


def _int8_storage(graph: Path, feeds, name: str, progress, work: Path):
    model = load_model(graph)
    stored = store_weights_int8(model)
    if not stored.tensors:
        raise EngineError(f"{name}: no Conv/MatMul/Gemm weight of >= {MIN_ELEMENTS} fp32 elements to store as INT8")
    progress(f"{name}: {stored.tensors} weights stored INT8, {stored.bytes_before / 1e6:.0f} MB -> "
             f"{stored.bytes_after / 1e6:.0f} MB")
    return model, PRECISION["int8-storage"]


def _fp16(graph: Path, feeds, name: str, progress, work: Path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    clean = _cleaned(graph, work)
    peaks = activation_peaks(clean, feeds, work)
    limit = FP16_MAX / FP16_HEADROOM
    hot = {t for t, v in peaks.items() if v > limit}
    model = load_model(clean)
    blocked = [n.name for n in model.graph.node if any(o in hot for o in n.output)]
    progress(f"{name}: {len(blocked)} node(s) stay fp32 (calibrated |activation| > {limit:.0f})")
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked,
                                         disable_shape_infer=weights_bytes(model) > EXTERNAL_DATA_THRESHOLD)
    return converted, ("mixed-fp16" if blocked else "fp16")


def activation_peaks(graph: Path, feeds, workdir: Path) -> dict[str, float]:
    """max |x| of every float tensor of ``graph`` over ``feeds`` (ONNX Runtime's MinMax calibrator, which adds
    ReduceMin/ReduceMax nodes, so only two scalars per tensor and input are kept)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    if not feeds:
        raise EngineError(f"no calibration inputs for {graph}")
    cal = create_calibrator(str(graph), None, augmented_model_path=str(workdir / "augmented.onnx"),
                            calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=_has_external_data(graph))
    cal.collect_data(_Reader(feeds))
    ranges = cal.compute_data()
    return {name: float(max(abs(float(np.max(r.range_value[0]))), abs(float(np.max(r.range_value[1])))))
            for name, r in ranges.data.items()}


_QUANTIZERS = {"fp16": _fp16, "int8-weights": _int8_weights, "int4-weights": _int4_weights,
               "int8-storage": _int8_storage}
