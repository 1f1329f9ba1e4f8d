"""Fuse the exported attention of a UNet into ONNX Runtime's ``MultiHeadAttention``, from the graph's structure alone.

ONNX Runtime's transformer optimizer (engines.optimize) fuses attention too, but it works on the whole model in
memory -- weights, a shape-inferred copy and the saved copy -- about four times the weights: an SDXL UNet (10.3 GB
fp32) cannot go through it on a 24 GB machine. This pass reads no weight: it matches the layout ops around the two
attention products and replaces them by one node, so it runs on a graph loaded without its external data
(``onnx.load(..., load_external_data=False)``) and the weights file stays as it is.

The exported pattern (diffusers' attention processor traced by torch.onnx, SDPA decomposed), per attention:
    q3, k3, v3 = x W_q, c W_k, c W_v                          (B, S, H*D), (B, L, H*D), (B, L, H*D)
    heads(t)   = Reshape(Transpose(Reshape(t, [B, S, H, D]), [0, 2, 1, 3]), [B*H, S, D])   (or left 4-D)
    scores     = MatMul(heads(q3), Transpose(heads(k3), [0, 2, 1])) * scale (+ zeros: baddbmm's beta=0 input)
    o3         = merge(MatMul(Softmax(scores, -1), heads(v3)))  merge: Reshape -> Transpose [0,2,1,3] -> Reshape
i.e. softmax(Q K^T * scale) V per head (Vaswani et al. 2017, eq. 1), which is MultiHeadAttention(q3, k3, v3) with
``num_heads=H`` and ``scale`` (com.microsoft contrib op; CPU and CUDA kernels, the CPU one without the (B, H, S, L)
score matrix in memory). Anything that does not match exactly -- a mask, a non-float cast, an unknown head count -- is
left as it was.

The transformers (SD3/3.5's joint attention; diffusers' default processor, ``F.scaled_dot_product_attention`` traced
by torch.onnx) reach the two products with the heads already split, 4-D:
    q4, k4, v4 (B, H, S, D) -- after the per-head RMS norms and the text/image join, or (B, S, H, D) with a Transpose
    scores = MatMul(q4 * f, Transpose(k4, [0, 1, 3, 2]) * f),  f = sqrt(1 / sqrt(D)) computed from q4's shape
    o3     = Reshape(Transpose(MatMul(Softmax(scores), v4), [0, 2, 1, 3]), [B, S, H*D])
f * f is SDPA's default scale 1/sqrt(D), which is also MultiHeadAttention's default; the head count is read from
ONNX shape inference (a tiny graph pass: no weights). The query goes in as (B, S, H*D) through one Transpose + Reshape;
key and value go in as they are (MultiHeadAttention takes (B, H, L, D) keys and values), so the join and the norms
stay where they were.
"""
from __future__ import annotations

from dataclasses import dataclass

MS_DOMAIN = "com.microsoft"
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class Match:
    query: str
    key: str
    value: str
    output: str
    heads: int
    scale: float  # 0.0: MultiHeadAttention's default 1/sqrt(D), the graph's own (SDPA's default, see module doc)
    name: str
    # how query/key/value are laid out: "bsd" (B, S, H*D) as MultiHeadAttention takes them, or heads split:
    # "bsnh" (B, S, H, D), "bnsh" (B, H, S, D). fuse_attention adds the layout ops a split query or key needs.
    layouts: tuple[str, str, str] = ("bsd", "bsd", "bsd")


class _Graph:
    """Producer/consumer maps and constant values of one graph (small constants only: weights are not read)."""

    def __init__(self, graph, opsets=()):
        self.graph = graph
        self.opsets = list(opsets)
        self._shapes: dict | None = None
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def node(self, name: str, op: str):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, name: str, op: str):
        """The one consumer of ``name`` besides Shape nodes, when it is an ``op``. The Shapes only size the layout
        ops being fused away; fuse_attention checks that nothing else still needs them."""
        users = [u for u in self.consumers.get(name, []) if u.op_type != "Shape"]
        if len(users) != 1 or users[0].op_type != op or name in self.outputs:
            return None
        return users[0]

    def value(self, name: str):
        """The value of a small constant (Constant node or inline initializer), or None."""
        from onnx import numpy_helper

        t = self.initializers.get(name)
        if t is None:
            n = self.producer.get(name)
            if n is None or n.op_type != "Constant":
                return None
            t = next((a.t for a in n.attribute if a.name == "value"), None)
            if t is None:
                return None
        if t.data_location == 1:  # EXTERNAL: never read weights here
            return None
        return numpy_helper.to_array(t)

    def dim(self, name: str, axis: int) -> int | None:
        """Dimension ``axis`` of ``name`` when ONNX shape inference (with data propagation, run once, on the graph
        without its weights) knows it as a number."""
        if self._shapes is None:
            self._shapes = _inferred_shapes(self.graph, self.opsets)
        dims = self._shapes.get(name)
        return dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None

    def scalar(self, name: str) -> float | None:
        v = self.value(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def is_zeros(self, name: str) -> bool:
        """A tensor that is zero whatever its shape: ConstantOfShape(0), optionally times a constant."""
        n = self.producer.get(name)
        if n is not None and n.op_type == "Mul":
            return any(self.is_zeros(i) for i in n.input) and all(
                self.is_zeros(i) or self.scalar(i) is not None for i in n.input)
        if n is not None and n.op_type == "ConstantOfShape":
            v = next((a.t for a in n.attribute if a.name == "value"), None)
            from onnx import numpy_helper

            return v is None or not numpy_helper.to_array(v).any()
        v = self.value(name)
        return v is not None and not v.any()


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _heads_from_shape(g: _Graph, shape: str) -> int | None:
    """H of a Reshape to [B, S, H, D]: the shape's third entry, a constant or a Concat's constant third input."""
    v = g.value(shape)
    if v is not None:
        return int(v[2]) if v.shape == (4,) and v[2] > 0 else None
    concat = g.node(shape, "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    h = g.value(concat.input[2])
    return int(h.reshape(-1)[0]) if h is not None and h.size == 1 and h.reshape(-1)[0] > 0 else None


def _split_heads(g: _Graph, name: str) -> tuple[str, int] | None:
    """(t, H) when ``name`` is heads(t): [Reshape to B*H,S,D] <- Transpose [0,2,1,3] <- Reshape [B,S,H,D] <- t."""
    n = g.producer.get(name)
    if n is not None and n.op_type == "Reshape":  # the optional merge of batch and heads
        n = g.producer.get(n.input[0])
    if n is None or n.op_type != "Transpose" or _perm(n) != [0, 2, 1, 3]:
        return None
    split = g.node(n.input[0], "Reshape")
    if split is None:
        return None
    heads = _heads_from_shape(g, split.input[1])
    return (split.input[0], heads) if heads else None


def _merged_output(g: _Graph, product: str) -> str | None:
    """o3 when ``product`` (the P V MatMul) flows only into merge: [Reshape] -> Transpose [0,2,1,3] -> Reshape."""
    n = g.only_consumer(product, "Reshape") or g.only_consumer(product, "Transpose")
    if n is not None and n.op_type == "Reshape":
        n = g.only_consumer(n.output[0], "Transpose")
    if n is None or _perm(n) != [0, 2, 1, 3]:
        return None
    merge = g.only_consumer(n.output[0], "Reshape")
    return merge.output[0] if merge is not None else None


def _scores(g: _Graph, name: str) -> tuple[object, float] | None:
    """(the Q K^T MatMul, scale) behind the Softmax input ``name``: [+ zeros] [* or / a scalar] MatMul."""
    n = g.producer.get(name)
    if n is not None and n.op_type == "Add":
        rest = [i for i in n.input if not g.is_zeros(i)]
        if len(rest) != 1:
            return None  # a real mask: MultiHeadAttention would need it as an input; left alone
        n = g.producer.get(rest[0])
    scale = 1.0
    if n is not None and n.op_type in ("Mul", "Div"):
        consts = [(k, g.scalar(i)) for k, i in enumerate(n.input) if g.scalar(i) is not None]
        if len(consts) != 1 or (n.op_type == "Div" and consts[0][0] != 1):
            return None
        scale = consts[0][1] if n.op_type == "Mul" else 1.0 / consts[0][1]
        n = g.producer.get(n.input[1 - consts[0][0]])
    if n is None or n.op_type != "MatMul" or not scale:
        return None  # (MultiHeadAttention reads scale 0 as "the default, 1/sqrt(head size)")
    return n, scale


def _unscaled(g: _Graph, name: str) -> tuple[str, object]:
    """(t, f) when ``name`` is t * f, f a scalar constant (a float) or SDPA's own factor (the string "sdpa:" + the
    tensor whose last dim sizes it); (name, None) otherwise."""
    n = g.node(name, "Mul")
    if n is None:
        return name, None
    for k in (0, 1):
        c = g.scalar(n.input[k])
        if c is not None:
            return n.input[1 - k], c
        sized = _sdpa_factor(g, n.input[k])
        if sized is not None:
            return n.input[1 - k], "sdpa:" + sized
    return name, None


def _sdpa_factor(g: _Graph, name: str) -> str | None:
    """x when ``name`` is torch.onnx's SDPA factor sqrt(1 / sqrt(last dim of x)): Sqrt <- Div(1, Sqrt <- Slice(Shape(x),
    [-1])), Casts allowed between."""
    def past_casts(t):
        n = g.producer.get(t)
        while n is not None and n.op_type == "Cast":
            n = g.producer.get(n.input[0])
        return n

    outer = g.node(name, "Sqrt")
    div = past_casts(outer.input[0]) if outer is not None else None
    if div is None or div.op_type != "Div" or g.scalar(div.input[0]) != 1.0:
        return None
    inner = past_casts(div.input[1])
    last = past_casts(inner.input[0]) if inner is not None and inner.op_type == "Sqrt" else None
    if last is None or last.op_type != "Slice" or len(last.input) != 3:  # no axes/steps: axis 0, step 1
        return None
    start, end = g.value(last.input[1]), g.value(last.input[2])
    shape = g.node(last.input[0], "Shape")
    whole = shape is not None and all(a.name == "start" and a.i == 0 for a in shape.attribute)  # the full shape
    if not whole or start is None or end is None or start.reshape(-1).tolist() != [-1] or end.size != 1 \
            or end.reshape(-1)[0] < 2**31 - 1:  # [-1:] (torch writes INT64_MAX for "to the end")
        return None
    return shape.input[0]


def _heads_first(g: _Graph, name: str) -> tuple[str, str]:
    """A (B, H, S, D) operand as (tensor, layout): the (B, S, H, D) tensor behind a Transpose [0, 2, 1, 3], or itself."""
    n = g.node(name, "Transpose")
    return (n.input[0], "bsnh") if n is not None and _perm(n) == [0, 2, 1, 3] else (name, "bnsh")


def _split_match(g: _Graph, qk, scale: float, v_name: str):
    """The UNet's pattern: (q3, k3, v3, H, scale, layouts) with heads split by Reshape/Transpose, or None."""
    kt = g.node(qk.input[1], "Transpose")
    if kt is None or _perm(kt) not in ([0, 2, 1], [0, 1, 3, 2]):
        return None
    q, k, v = _split_heads(g, qk.input[0]), _split_heads(g, kt.input[0]), _split_heads(g, v_name)
    if q is None or k is None or v is None or not q[1] == k[1] == v[1]:
        return None
    return q[0], k[0], v[0], q[1], scale, ("bsd", "bsd", "bsd")


def _four_d_match(g: _Graph, qk, scale: float, v_name: str):
    """The transformers' pattern (module doc): heads already split, scaled on both sides. Same result shape as
    _split_match, or None."""
    q4, fq = _unscaled(g, qk.input[0])
    kt_name, fk = _unscaled(g, qk.input[1])
    if isinstance(fq, float) and isinstance(fk, float):
        scale *= fq * fk
    elif fq is not None or fk is not None:  # SDPA's factor on both sides, computed from the query: 1/sqrt(D) in all
        if not (fq == fk == "sdpa:" + q4) or scale != 1.0:
            return None
        scale = 0.0
    kt = g.node(kt_name, "Transpose")
    if kt is None or _perm(kt) not in ([0, 1, 3, 2], [0, 2, 3, 1]):
        return None
    (q, q_layout), (v, v_layout) = _heads_first(g, q4), _heads_first(g, v_name)
    k, k_layout = kt.input[0], "bnsh" if _perm(kt) == [0, 1, 3, 2] else "bsnh"
    heads = {g.dim(t, 1 if layout == "bnsh" else 2) for t, layout in ((q, q_layout), (k, k_layout), (v, v_layout))}
    h = heads.pop() if len(heads) == 1 else None
    if not isinstance(h, int) or h < 1 or scale < 0:
        return None
    return q, k, v, h, scale, (q_layout, k_layout, v_layout)


def _inferred_shapes(graph, opsets) -> dict[str, list]:
    """Every tensor's inferred dims (an int, or None where unknown) from ONNX shape inference with data propagation
    (Shape/Slice/Concat arithmetic followed), on a copy of ``graph``; {} when inference fails."""
    from onnx import helper, shape_inference

    try:
        model = helper.make_model(graph, opset_imports=list(opsets) or [helper.make_opsetid("", 17)])
        inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # noqa: BLE001 - an op inference does not know: nothing to read, nothing fused by shape
        return {}
    shapes = {}
    for v in (*inferred.input, *inferred.value_info, *inferred.output):
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return shapes


def find_attention(graph, opsets=()) -> list[Match]:
    """Every attention in ``graph`` that the patterns in the module doc describe exactly. ``opsets``: the model's
    opset imports, for shape inference (the transformers' head count)."""
    g = _Graph(graph, opsets)
    found = []
    for softmax in graph.node:
        if softmax.op_type != "Softmax":
            continue
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        if axis not in (-1, 2, 3):
            continue
        probs = softmax.output[0]
        cast = g.only_consumer(probs, "Cast")
        if cast is not None:
            if next((a.i for a in cast.attribute if a.name == "to"), None) != FLOAT:
                continue
            probs = cast.output[0]
        pv = g.only_consumer(probs, "MatMul")
        if pv is None or pv.input[0] != probs:
            continue
        got = _scores(g, softmax.input[0])
        if got is None:
            continue
        qk, scale = got
        out = _merged_output(g, pv.output[0])
        parts = out and (_split_match(g, qk, scale, pv.input[1]) or _four_d_match(g, qk, scale, pv.input[1]))
        if not parts:
            continue
        q, k, v, heads, scale, layouts = parts
        found.append(Match(query=q, key=k, value=v, output=out, heads=heads, scale=scale,
                           name=softmax.name or probs, layouts=layouts))
    return found


def fuse_attention(model) -> int:
    """Replace every matched attention in ``model`` (in place) by one MultiHeadAttention node; returns how many.
    The nodes the fused ones no longer need are removed (shape arithmetic included)."""
    from onnx import helper

    graph = model.graph
    if any(a.type in (5, 10) for n in graph.node for a in n.attribute):  # GRAPH, GRAPHS: If/Loop bodies
        return 0  # their bodies may read any outer name: the dead-node sweep below could not see those uses
    matches = find_attention(graph, model.opset_import)
    if not matches:
        return 0
    fused_outputs = {m.output for m in matches}
    keep = [n for n in graph.node if not (set(n.output) & fused_outputs)]
    for m in matches:
        inputs, layout_ops = _mha_inputs(m)
        scale = {"scale": m.scale} if m.scale else {}  # none: MultiHeadAttention's default 1/sqrt(D)
        keep += layout_ops
        keep.append(helper.make_node("MultiHeadAttention", inputs, [m.output], name=f"{m.name}/fused_mha",
                                     domain=MS_DOMAIN, num_heads=m.heads, **scale))
    live = _live(keep, graph)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in live for o in n.output}
    if any(i and i not in known for n in live for i in n.input):
        return 0  # cannot happen (only the merge's last node is replaced); never save a graph that would not load
    del graph.node[:]
    graph.node.extend(live)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(matches)


def _mha_inputs(m: Match) -> tuple[list[str], list]:
    """MultiHeadAttention's query, key, value for ``m`` and the layout nodes that make them: the query as (B, S, H*D);
    key and value as they are when both are (B, H, L, D) (a layout the op takes), else both as (B, L, H*D)."""
    import numpy as np
    from onnx import helper, numpy_helper

    ops, names = [], []
    base = f"{m.name}/fused_mha"
    shape = f"{base}/bsd_shape"  # [0, 0, -1]: (B, S, H, D) -> (B, S, H*D), 0 keeps a dim
    keep_4d = m.layouts[1] == m.layouts[2] == "bnsh"
    for role, name, layout in zip("qkv", (m.query, m.key, m.value), m.layouts):
        if layout == "bsd" or (role != "q" and keep_4d):
            names.append(name)
            continue
        if layout == "bnsh":  # (B, H, S, D) -> (B, S, H, D)
            ops.append(helper.make_node("Transpose", [name], [f"{base}/{role}_bsnh"], perm=[0, 2, 1, 3],
                                        name=f"{base}/{role}_transpose"))
            name = f"{base}/{role}_bsnh"
        ops.append(helper.make_node("Reshape", [name, shape], [f"{base}/{role}_bsd"], name=f"{base}/{role}_reshape"))
        names.append(f"{base}/{role}_bsd")
    if ops:
        ops.insert(0, helper.make_node("Constant", [], [shape], name=shape,
                                       value=numpy_helper.from_array(np.array([0, 0, -1], np.int64))))
    return names, ops


def _live(nodes: list, graph) -> list:
    """``nodes`` less those whose outputs nothing uses, in topological order: one pass from the graph's outputs
    back, so a node whose only users were dropped is dropped too."""
    needed = {o.name for o in graph.output}
    alive = []
    for n in reversed(_topological(nodes)):
        if any(o in needed for o in n.output):
            alive.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(alive))


def _topological(nodes: list) -> list:
    """``nodes`` in an order where each comes after the producers of its inputs (ONNX requires it)."""
    produced_by = {o: k for k, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)  # 0 new, 1 visiting, 2 placed
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            k, ready = stack.pop()
            if ready:
                if state[k] != 2:
                    state[k] = 2
                    order.append(nodes[k])
                continue
            if state[k]:
                continue
            state[k] = 1
            stack.append((k, True))
            for i in nodes[k].input:
                p = produced_by.get(i)
                if p is not None and not state[p]:
                    stack.append((p, False))
    return order
