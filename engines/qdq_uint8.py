"""Activation Q/DQ pairs of an INT8 graph as uint8, for ONNX Runtime's CPU integer kernels.

``quantize --int8`` writes signed, symmetric INT8 activations (what TensorRT requires). ONNX Runtime's x86 CPU
kernels run u8 x s8 (activations unsigned): at load it turns each s8 Quantize->Dequantize pair into u8 (its
QDQS8ToU8Transformer), but only a pair whose Quantize feeds exactly one Dequantize with one consumer. An input shared by
several projections -- the normalized hidden states behind every attention's q, k and v -- keeps one Quantize and
several Dequantizes (ONNX Runtime's own EnsureUniqueDQForNodeUnit makes them), so it stays s8 while the projection's
output became u8, and the fusion into QLinearMatMul, which needs both the same type, gives up: those MatMuls ran as
dequantized float MatMuls (slower than fp32). Measured on SDXL: 210 of 582 INT8 MatMuls.

The conversion here is exact: a value q with zero point z dequantizes to (q - z) * s, and q + 128 with z + 128 to the
same; quantizing x gives clamp(round(x / s) + z, -128, 127) + 128 = clamp(round(x / s) + z + 128, 0, 255). It changes
the zero-point initializers (scalars, inline) and nothing else, so it runs on a graph loaded without its weights.
Weights (Dequantize of an initializer) stay s8.
"""
from __future__ import annotations

INT8, UINT8 = 3, 2  # onnx.TensorProto element types


def activations_to_uint8(model) -> int:
    """Convert, in place, every activation Q/DQ zero point of ``model`` that is used only by Quantize nodes of a
    computed tensor and by Dequantize nodes of those Quantizes' outputs; returns how many zero points changed."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            if i in inits:
                users.setdefault(i, []).append(n)
    converted, retyped = 0, set()
    for name, zp in inits.items():
        if zp.data_type != INT8 or zp.data_location == 1 or name not in users:
            continue
        nodes = users[name]
        quantizes = [n for n in nodes if n.op_type == "QuantizeLinear"]
        if not quantizes or not all(_is_activation_pair_user(n, name, quantizes, producer, inits) for n in nodes):
            continue
        zp.CopyFrom(numpy_helper.from_array(
            (numpy_helper.to_array(zp).astype(np.int16) + 128).astype(np.uint8), name))
        retyped.update(q.output[0] for q in quantizes)
        converted += 1
    for info in graph.value_info:  # the Quantize outputs' recorded type, if shape inference wrote one
        if info.name in retyped and info.type.tensor_type.elem_type == INT8:
            info.type.tensor_type.elem_type = UINT8
    return converted


def _is_activation_pair_user(node, zp: str, quantizes: list, producer: dict, inits: dict) -> bool:
    """``node`` uses zero point ``zp`` as one half of an activation pair: a Quantize of a computed tensor (no
    output_dtype attribute: its type follows the zero point), or a Dequantize of one of ``quantizes``' outputs."""
    if len(node.input) < 3 or node.input[2] != zp or node.input[0] in inits:
        return False
    if node.op_type == "QuantizeLinear":
        return not any(a.name == "output_dtype" for a in node.attribute)
    if node.op_type == "DequantizeLinear":
        return producer.get(node.input[0]) in quantizes
    return False
