"""Min/max calibration of a graph's activations without a second copy of its weights in memory.

ONNX Runtime's own calibrator (``onnxruntime.quantization.create_calibrator``, inside ``quantize_static``) holds the
loaded model, a shape-inferred clone it augments, and the inference session on the augmented copy at once -- about
three times the weights, while ``quantize_static`` keeps a fourth copy loaded for the quantizer: an SDXL UNet (10.3 GB
fp32) cannot be calibrated that way in 24 GB. Here the graph is loaded without its external data, the reductions are
added to that structure, and the augmented graph is saved next to a hard link of the weights file
(``graphs.save_graph_beside``): only the session holds the weights. The result is the same as ONNX Runtime's MinMax
calibrator's with ``CalibTensorRangeSymmetric`` -- the inputs and outputs of the calibrated op types, each range
``[-m, m]`` with ``m`` the largest ``|x|`` seen over every feed -- and is written in its calibration-cache format
(``calibrate.save_tensors_data``), which ``quantize_static(calibration_cache_path=...)`` reads instead of
calibrating again.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from edgediff.backends.ort import OrtOptions
from edgediff.errors import EngineError

from .graphs import load_model, save_graph_beside

FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16: what ONNX Runtime's calibrator calibrates
SUFFIX = "__edgediff_absmax"


def calibrated_tensors(model, op_types: Iterable[str]) -> list[str]:
    """The float activations ONNX Runtime's calibrator would record for ``op_types``: every input and output of
    those nodes with a known float type that is not an initializer (``CalibraterBase.select_tensors_to_calibrate``).
    ``model`` must carry inferred types (``onnx.shape_inference.infer_shapes``)."""
    types = {v.name: v.type for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    inits = {t.name for t in model.graph.initializer}
    kinds = set(op_types)
    found: dict[str, None] = {}  # ordered set: the graph's order, so the augmented outputs are reproducible
    for node in model.graph.node:
        if node.op_type not in kinds:
            continue
        for name in (*node.input, *node.output):
            t = types.get(name)
            if name and name not in inits and t is not None and t.HasField("tensor_type") \
                    and t.tensor_type.elem_type in FLOAT_TYPES:
                found[name] = None
    return list(found)


def absmax(graph: Path, feeds: Sequence[Mapping[str, np.ndarray]], op_types: Iterable[str], work: Path) -> dict[str, float]:
    """max |x| over ``feeds`` of every tensor ``calibrated_tensors`` selects in ``graph`` (a file whose weights may
    lie in an external-data file beside it). ``work``: a scratch folder on the same filesystem as ``graph``."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    if not feeds:
        raise EngineError(f"no calibration inputs for {graph}")
    model = load_model(graph, weights=False)
    typed = onnx.shape_inference.infer_shapes(model)  # types of the intermediate tensors; reads no weight
    tensors = calibrated_tensors(typed, op_types)
    elem = {v.name: v.type.tensor_type.elem_type for v in (*typed.graph.value_info, *typed.graph.input,
                                                           *typed.graph.output)}
    del typed
    if not tensors:
        raise EngineError(f"{graph}: no {'/'.join(op_types)} activation to calibrate")
    reductions: dict[str, list] = {}
    for i, name in enumerate(tensors):
        # max(|x|) as one scalar per tensor: a symmetric range needs nothing else (and ReduceMax without axes
        # reduces every axis in every opset)
        a, out = f"{name}{SUFFIX}_abs", f"{name}{SUFFIX}"
        reductions[name] = [helper.make_node("Abs", [name], [a], name=f"edgediff_calib_abs_{i}"),
                            helper.make_node("ReduceMax", [a], [out], keepdims=0, name=f"edgediff_calib_max_{i}")]
        model.graph.output.append(helper.make_tensor_value_info(out, elem[name], []))
    # each reduction right after the node that makes its tensor (graph inputs': first), so that with the
    # priority-based order below it runs as soon as its tensor exists
    nodes = [n for i in model.graph.input for n in reductions.get(i.name, ())]
    for node in model.graph.node:
        nodes += [node, *(n for o in node.output for n in reductions.get(o, ()))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = Path(work) / "calibration" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=False)
    save_graph_beside(model, path, graph)
    del model
    # the graph as it is, as ONNX Runtime's calibrator runs it: fusions would not change a value, but could remove a
    # tensor that is not otherwise an output. Priority-based order (ties broken by the node order above) runs each
    # reduction as soon as its tensor exists; in the default order, or with the reductions appended at the end,
    # they ran after the graph's own output, every calibrated activation alive until then (SDXL UNet at 512x512:
    # 10.9 GiB of activations instead of 0.4)
    options = OrtOptions(graph_optimization_level="disable", disable_prepacking=True).session_options()
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"{graph}: ONNX Runtime could not open the calibration graph: {text}") from None
    wanted = [f"{n}{SUFFIX}" for n in tensors]
    inputs = {i.name for i in session.get_inputs()}
    peak = np.zeros(len(tensors), dtype=np.float64)
    for feed in feeds:
        values = session.run(wanted, {k: v for k, v in feed.items() if k in inputs})
        # nan-ignoring, as ONNX Runtime's calibrator (np.nanmax)
        peak = np.fmax(peak, np.asarray([float(v) for v in values], dtype=np.float64))
    del session
    # the link goes: onnx.load refuses a weights file with several hard links (a guard against link attacks), and
    # the quantizer loads the graph this one was linked from next
    shutil.rmtree(path.parent)
    return dict(zip(tensors, peak.tolist()))


def write_cache(peaks: Mapping[str, float], path: Path) -> Path:
    """``peaks`` as symmetric ranges in ONNX Runtime's calibration-cache file (MinMax method)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    ranges = {name: (np.array([-m], dtype=np.float32), np.array([m], dtype=np.float32)) for name, m in peaks.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), path)
    return Path(path)


def cache_supported() -> bool:
    """Whether the installed ``quantize_static`` reads a calibration cache (newer ONNX Runtime)."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters
