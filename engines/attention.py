"""Find the projection layers of attention blocks in an exported graph, from its structure alone.

Attention is softmax(Q K^T / sqrt(d)) V with Q = x W_q, K = c W_k, V = c W_v, and the result projected by W_out
(Vaswani et al. 2017, eq. 1). In the exported ONNX the two products of activations (Q K^T and P V) are MatMuls
with no constant input; the projections are MatMuls by a weight initializer, reached from those products through
layout-only ops (Reshape, Transpose, a scale Mul/Div). ONNX Runtime's attention fusion matches exactly that
pattern, so a Q/DQ pair on any projection hides the attention from it (docs/engines.md).
"""
from __future__ import annotations

from .graphs import constant_names

# ops between a projection and the attention products that only move, scale or split the data
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Mul", "Div", "Cast", "Split", "Slice",
                        "Flatten"})


def attention_projections(model) -> set[str]:
    """Names of the weight MatMul/Gemm nodes that compute Q, K, V or the output projection of an attention."""
    graph = model.graph
    constants = constant_names(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_weight_matmul(n) -> bool:
        return n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants

    def is_product(n) -> bool:  # Q K^T or P V: both operands computed
        return n.op_type == "MatMul" and not any(i in constants for i in n.input)

    found: set[str] = set()
    for node in graph.node:
        if not is_product(node):
            continue
        for name in node.input:  # upstream: Q, K (for Q K^T) or V (for P V)
            p = producer.get(name)
            while p is not None and p.op_type in LAYOUT_OPS:
                p = producer.get(p.input[0])
            if p is not None and is_weight_matmul(p):
                found.add(p.name)
        frontier = list(consumers.get(node.output[0], []))  # downstream of P V: the output projection
        seen = set()
        while frontier:
            c = frontier.pop()
            if id(c) in seen:
                continue
            seen.add(id(c))
            if is_weight_matmul(c):
                found.add(c.name)
            elif c.op_type in LAYOUT_OPS:
                frontier.extend(consumers.get(c.output[0], []))
    return found
