"""The Q/DQ structure TensorRT's explicit-quantization parser accepts, checked on a quantized graph.

TensorRT (10.x, 11.x) reads precision from QuantizeLinear/DequantizeLinear pairs and requires: symmetric
quantization (every zero-point 0); signed INT8 (or FP8 E4M3) data, not UINT8; positive finite scales; per-tensor
scales for activations; weights per-tensor or per-channel along the output-channel axis of their consumer
(Conv: axis 0 of the OIHW kernel; MatMul: the last axis of the K x N weight); no quantized bias (TensorRT
fuses float biases itself). ``violations`` lists every breach, one line each; an empty list passes.
"""
from __future__ import annotations

import numpy as np

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")
ALLOWED_TYPES = {"int8": ("INT8",), "fp8": ("FLOAT8E4M3FN",)}


def violations(model, kind: str = "int8") -> list[str]:
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    tensors = {**consts, **inits}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    allowed = ALLOWED_TYPES[kind]
    out: list[str] = []
    n_pairs = 0
    for node in model.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        n_pairs += 1
        where = f"{node.op_type} {node.name or node.output[0]}"
        scale = tensors.get(node.input[1])
        if scale is None:
            out.append(f"{where}: scale is not a constant")
            continue
        s = numpy_helper.to_array(scale).astype(np.float64)
        if not (np.isfinite(s).all() and (s > 0).all()):
            out.append(f"{where}: scale must be positive and finite (min {s.min():.3g})")
        if len(node.input) > 2 and node.input[2]:
            zp = tensors.get(node.input[2])
            if zp is None:
                out.append(f"{where}: zero-point is not a constant")
            else:
                ztype = onnx.TensorProto.DataType.Name(zp.data_type)
                if ztype not in allowed:
                    out.append(f"{where}: quantized type {ztype}; TensorRT needs {' or '.join(allowed)}")
                if np.any(numpy_helper.to_array(zp).astype(np.float64) != 0):
                    out.append(f"{where}: zero-point is not 0 (asymmetric); TensorRT needs symmetric quantization")
        elif kind == "int8":
            out.append(f"{where}: no zero-point, so the type defaults to UINT8; TensorRT needs INT8")
        if node.op_type != "DequantizeLinear":
            continue
        data = tensors.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if data is not None and data.data_type == onnx.TensorProto.INT32:
            out.append(f"{where}: quantized bias (INT32); keep biases float for TensorRT")
            continue
        if s.size > 1:  # per-channel: only for weights, along the consumer's output-channel axis
            if data is None:
                out.append(f"{where}: per-channel scale on an activation; activations must be per-tensor")
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            rank = len(data.dims)
            axis = axis + rank if axis < 0 else axis
            for user in users:
                want = {"Conv": 0, "ConvTranspose": 1, "MatMul": rank - 1}.get(user.op_type)
                if want is None:
                    continue
                if axis != want:
                    out.append(f"{where}: per-channel axis {axis} for {user.op_type} weight of shape "
                               f"{list(data.dims)}; the output-channel axis is {want}")
    if n_pairs == 0:
        out.append("no QuantizeLinear/DequantizeLinear nodes: the graph is not quantized")
    return out
