"""INT8 weight storage: a graph's large weights kept as INT8 and dequantized to fp32 when each node runs.

The arithmetic and the activations stay fp32, so nothing about the graph's numerics changes except the rounding of
the weights (symmetric, per output channel: w ~ scale_c * q, q in [-127, 127], scale_c = max|w_c| / 127). What it
buys is resident memory: ONNX Runtime keeps INT8 weights (a quarter of fp32) and each ``DequantizeLinear`` output
lives only until its consumer has run, so at any moment one layer's fp32 weight exists, not all of them. That is
what a memory-bound device (8 GB Jetson, the runtime's low-memory mode) needs; the price is the dequantization
at every call and the loss of ONNX Runtime's pre-packed weights (docs/memory.md has the measurements).

The rewrite keeps every tensor name: the ``DequantizeLinear`` outputs the name the weight had, so it applies to
any graph, including one already optimized by ONNX Runtime (fused ``FusedConv``/``FusedMatMul``/``Gemm``/
``Attention``, whose CPU kernels take run-time weights when they are not constant), which
the runtime opens with graph optimizations off -- nothing folds the dequantization back into fp32 weights. Opened
with optimizations on, ONNX Runtime's constant folding also leaves ``DequantizeLinear`` alone (it keeps Q/DQ
graphs intact for its quantization fusions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgediff.errors import EngineError

# op type -> index of its weight input
WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "ConvTranspose": 1, "MatMul": 1, "FusedMatMul": 1, "Gemm": 1,
                "Attention": 1}  # com.microsoft Attention (fused self-attention): packed QKV weights [H, 3H]
MIN_ELEMENTS = 4096  # smaller weights (and every bias and norm scale) stay fp32: they save nothing worth a node
QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


@dataclass(frozen=True)
class Stored:
    tensors: int  # weights now stored INT8
    bytes_before: int
    bytes_after: int  # INT8 data + fp32 scales + INT8 zero points


def output_channel_axis(node, rank: int) -> int | None:
    """The axis of ``node``'s weight that indexes its output channels (one scale per channel), or None when the
    weight's layout is not one this rewrite knows."""
    op = node.op_type
    if op in ("Conv", "FusedConv"):
        return 0  # [C_out, C_in / groups, kH, kW]
    if op == "ConvTranspose":
        return 1  # [C_in, C_out / groups, kH, kW]
    if op == "Attention":
        return 1 if rank == 2 else None  # [hidden, 3 * hidden]: x @ W, as for MatMul
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        if rank != 2:
            return None
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # y = x @ B with B [K, N], or B^T with B [N, K]
    return None


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32 [C]) with w ~ q * scale along ``axis``; an all-zero channel gets scale 1."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    amax = np.max(np.abs(w), axis=reduce).astype(np.float32)  # [C]
    scale = np.where(amax > 0, amax / QMAX, np.float32(1.0)).astype(np.float32)  # positive: TensorRT's rule too
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def store_weights_int8(model, *, min_elements: int = MIN_ELEMENTS) -> Stored:
    """Rewrite ``model`` (an onnx.ModelProto, weights loaded) in place; returns what was stored."""
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise EngineError(f"the graph uses ONNX opset {opset}; per-channel DequantizeLinear needs opset >= 13 "
                          "(re-export the bundle with a newer opset)")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    # weight name -> the axes its consumers want; a weight used with two layouts is left alone
    axes: dict[str, set[int | None]] = {}
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        t = inits.get(node.input[index])
        if t is None or t.data_type != TensorProto.FLOAT:
            continue
        axes.setdefault(t.name, set()).add(output_channel_axis(node, len(t.dims)))
    # every other use of a candidate (a bias, a Shape) would see the same fp32 values: the name is kept
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {
        i.name for i in graph.input}
    dq_nodes, new_inits, drop = [], [], set()
    before = after = 0
    for name, wanted in axes.items():
        if len(wanted) != 1 or None in wanted:
            continue
        t = inits[name]
        if int(np.prod(t.dims)) < min_elements:
            continue
        (axis,) = wanted
        w = numpy_helper.to_array(t)
        q, scale = quantize_weight(w, axis)
        base = _fresh(f"{name}_int8", taken)
        q_name, s_name, z_name = base, _fresh(f"{base}_scale", taken), _fresh(f"{base}_zero_point", taken)
        zero = np.zeros(scale.shape, dtype=np.int8)
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name),
                      numpy_helper.from_array(zero, z_name)]
        dq_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [name],
                                         name=f"{base}_DequantizeLinear", axis=axis))
        drop.add(name)
        before += w.nbytes
        after += q.nbytes + scale.nbytes + zero.nbytes
    if not drop:
        return Stored(0, 0, 0)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    inputs = [i for i in graph.input if i.name not in drop]  # IR < 4 lists initializers as inputs too
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = dq_nodes + list(graph.node)  # dequantizations first: the node list stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return Stored(len(drop), before, after)


def _fresh(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out
