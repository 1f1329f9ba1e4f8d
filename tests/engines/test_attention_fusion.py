"""Attention fused from the graph's structure alone (engines.attention_fusion): exported UNets of two families keep
their outputs, a graph with a real mask or a non-float cast is left alone, and weights are never read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgediff.engines.attention_fusion import find_attention, fuse_attention

B, S, L, H, D = 2, 6, 5, 2, 4  # batch, query tokens, key tokens, heads, head size


def _attention_graph(*, mask: bool = False, cast_to: int = 1, scale_op: str = "Mul", scale: float | None = None):
    """One cross-attention in the exported pattern: q3 (B,S,H*D), k3/v3 (B,L,H*D) -> heads -> softmax -> merge,
    with the reshape shapes as constants (a static graph) and baddbmm's zeros added to the scores."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    nodes = [const("split_q", np.array([B, S, H, D], np.int64)), const("split_kv", np.array([B, L, H, D], np.int64)),
             const("bh_q", np.array([B * H, S, D], np.int64)), const("bh_kv", np.array([B * H, L, D], np.int64)),
             const("unbh", np.array([B, H, S, D], np.int64)), const("merged", np.array([B, S, H * D], np.int64)),
             const("scale", np.array(scale if scale is not None else 0.5 if scale_op == "Mul" else 2.0, np.float32)),
             const("zero_shape", np.array([B * H, S, L], np.int64))]
    for t, split, bh in (("q", "split_q", "bh_q"), ("k", "split_kv", "bh_kv"), ("v", "split_kv", "bh_kv")):
        nodes += [helper.make_node("Reshape", [t, split], [f"{t}4"]),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"{t}t", bh], [f"{t}h"])]
    nodes += [helper.make_node("Transpose", ["kh"], ["kT"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["qh", "kT"], ["qk"]),
              helper.make_node(scale_op, ["qk", "scale"], ["scaled"]),
              helper.make_node("ConstantOfShape", ["zero_shape"], ["zeros"],
                               value=numpy_helper.from_array(np.zeros(1, np.float32))),
              helper.make_node("Add", ["scaled", "mask" if mask else "zeros"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("Cast", ["probs"], ["probs_c"], to=cast_to),
              helper.make_node("MatMul", ["probs_c" if cast_to == 1 else "probs", "vh"], ["pv"]),
              helper.make_node("Reshape", ["pv", "unbh"], ["pv4"]),
              helper.make_node("Transpose", ["pv4"], ["pvt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["pvt", "merged"], ["out"])]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, S, H * D]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, L, H * D]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [B, L, H * D])]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B * H, S, L]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, S, H * D])]
    if cast_to != 1:
        outputs.append(helper.make_tensor_value_info("probs_c", cast_to, None))
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(rng):
    return {"q": rng.standard_normal((B, S, H * D), dtype=np.float32),
            "k": rng.standard_normal((B, L, H * D), dtype=np.float32),
            "v": rng.standard_normal((B, L, H * D), dtype=np.float32)}


@pytest.mark.parametrize("scale_op", ["Mul", "Div"])
def test_the_exported_pattern_becomes_one_node_with_the_same_output(scale_op):
    model = _attention_graph(scale_op=scale_op)
    feeds = _feeds(np.random.default_rng(0))
    (expected,) = _run(model, feeds)
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["MultiHeadAttention"]  # every layout op and constant of the pattern is gone
    (node,) = model.graph.node
    attrs = {a.name: (a.i if a.type == 2 else a.f) for a in node.attribute}
    assert attrs == {"num_heads": H, "scale": 0.5}
    assert list(node.input) == ["q", "k", "v"] and list(node.output) == ["out"]
    (got,) = _run(model, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_real_mask_is_left_alone():
    model = _attention_graph(mask=True)
    assert find_attention(model.graph) == [] and fuse_attention(model) == 0
    assert "Softmax" in [n.op_type for n in model.graph.node]


def test_a_zero_scale_is_left_alone():
    assert fuse_attention(_attention_graph(scale=0.0)) == 0  # MultiHeadAttention would read 0 as 1/sqrt(D)


def test_a_cast_to_another_precision_is_left_alone():
    model = _attention_graph(cast_to=10)  # float16 probabilities: MultiHeadAttention would keep float32
    assert fuse_attention(model) == 0


def test_a_tensor_also_used_outside_the_attention_is_still_computed():
    from onnx import TensorProto, helper

    model = _attention_graph()
    model.graph.output.append(helper.make_tensor_value_info("qk", TensorProto.FLOAT, None))  # the scores leave too
    feeds = _feeds(np.random.default_rng(4))
    expected = _run(model, feeds)
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "MultiHeadAttention" in ops and "MatMul" in ops and "Softmax" not in ops
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_exported_unets_fuse_every_attention_and_keep_their_outputs(family, request):
    import onnx

    from edgediff.bundle.reader import Bundle

    root = (request.getfixturevalue("tiny_sdxl_base").bundle if family == "sdxl"
            else request.getfixturevalue(f"tiny_{family}_bundle"))  # sd2v: SD 2.x, upcast attention, v-prediction
    bundle = Bundle.open(root)
    model = onnx.load(str(bundle.model_path("unet")))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    rng = np.random.default_rng(1)
    feeds = {}
    for spec in bundle.component("unet").inputs:
        shape = [2 if not isinstance(d, int) and "batch" in d else (8 if not isinstance(d, int) else d)
                 for d in spec.shape]
        if spec.name == "encoder_hidden_states":
            shape[1] = 77
        dtype = np.int64 if "int64" in spec.dtype else np.float32
        feeds[spec.name] = (np.array([500] * shape[0] if shape else 500, dtype).reshape(shape)
                            if spec.name == "timestep" else rng.standard_normal(shape).astype(dtype))
    expected = _run(model, feeds)
    assert softmaxes > 0 and fuse_attention(model) == softmaxes
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    got = _run(model, feeds)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_weights_stay_unread_and_are_linked_not_copied(tmp_path):
    """A graph loaded without its external data fuses and is saved beside a hard link to the same weights."""
    import onnx
    from onnx import helper, numpy_helper

    from edgediff.engines.graphs import EXTERNAL_DATA_NAME, load_model, save_graph_beside

    model = _attention_graph()
    w = np.random.default_rng(2).standard_normal((H * D, H * D)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w_q"))
    # q3 = x W_q, so the graph has a weight to keep outside
    model.graph.node.insert(0, helper.make_node("MatMul", ["x", "w_q"], ["q"]))
    model.graph.input[0].name = "x"
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, location=EXTERNAL_DATA_NAME, size_threshold=0)
    lean = load_model(src, weights=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in lean.graph.initializer)
    assert fuse_attention(lean) == 1
    dst = tmp_path / "dst" / "model.onnx"
    dst.parent.mkdir()
    save_graph_beside(lean, dst, src)
    assert (dst.parent / EXTERNAL_DATA_NAME).stat().st_ino == (src.parent / EXTERNAL_DATA_NAME).stat().st_ino
    feeds = _feeds(np.random.default_rng(3))
    feeds["x"] = feeds.pop("q")
    import onnxruntime as ort

    (expected,) = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)
    (got,) = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _sdpa_graph(*, factor_of: str = "q4", q_layout: str = "bnsh", key_perm=(0, 1, 3, 2)):
    """SDPA as torch.onnx writes it for the transformers (engines.attention_fusion's module doc): heads already split,
    q4 and K^T each times sqrt(1/sqrt(D)) computed from ``factor_of``'s shape, softmax, P V, heads merged.
    ``q_layout`` "bsnh": the query arrives as (B, S, H, D) behind a Transpose; ``key_perm`` (0, 2, 3, 1): the key too."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    nodes = [const("one", np.array(1.0, np.float32)), const("minus_one", np.array([-1], np.int64)),
             const("big", np.array([2**62], np.int64)), const("merged", np.array([B, S, H * D], np.int64)),
             helper.make_node("Shape", [factor_of], ["shape"]),
             helper.make_node("Slice", ["shape", "minus_one", "big"], ["d"]),
             helper.make_node("Cast", ["d"], ["d_f"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["d_f"], ["sqrt_d"]),
             helper.make_node("Div", ["one", "sqrt_d"], ["inv"]),
             helper.make_node("Sqrt", ["inv"], ["f"])]
    inputs = []
    if q_layout == "bsnh":
        nodes.append(helper.make_node("Transpose", ["q_bsnh"], ["q4"], perm=[0, 2, 1, 3]))
        inputs.append(helper.make_tensor_value_info("q_bsnh", TensorProto.FLOAT, [B, S, H, D]))
    else:
        inputs.append(helper.make_tensor_value_info("q4", TensorProto.FLOAT, [B, H, S, D]))
    key_shape = [B, H, L, D] if tuple(key_perm) == (0, 1, 3, 2) else [B, L, H, D]
    inputs += [helper.make_tensor_value_info("k4", TensorProto.FLOAT, key_shape),
               helper.make_tensor_value_info("v4", TensorProto.FLOAT, [B, H, L, D])]
    nodes += [helper.make_node("Mul", ["q4", "f"], ["q_s"]),
              helper.make_node("Transpose", ["k4"], ["kT"], perm=list(key_perm)),
              helper.make_node("Mul", ["kT", "f"], ["k_s"]),
              helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v4"], ["pv"]),
              helper.make_node("Transpose", ["pv"], ["pvt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["pvt", "merged"], ["out"])]
    graph = helper.make_graph(nodes, "sdpa", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds_for(model, rng):
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.parametrize("q_layout, key_perm", [("bnsh", (0, 1, 3, 2)), ("bsnh", (0, 1, 3, 2)),
                                                ("bnsh", (0, 2, 3, 1))])
def test_the_transformers_sdpa_pattern_becomes_one_node(q_layout, key_perm):
    model = _sdpa_graph(q_layout=q_layout, key_perm=key_perm)
    feeds = _feeds_for(model, np.random.default_rng(5))
    (expected,) = _run(model, feeds)
    (match,) = find_attention(model.graph, model.opset_import)
    assert match.heads == H and match.scale == 0.0  # SDPA's default 1/sqrt(D): MultiHeadAttention's default too
    assert fuse_attention(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Softmax" not in ops and ops.count("MultiHeadAttention") == 1
    mha = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
    assert [a.name for a in mha.attribute] == ["num_heads"]
    if key_perm == (0, 1, 3, 2):  # (B, H, L, D) key and value go in as they are
        assert list(mha.input[1:]) == ["k4", "v4"]
    (got,) = _run(model, feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_factor_sized_by_another_tensor_is_left_alone():
    model = _sdpa_graph(factor_of="v4")  # same D here, but not the pattern: the scale is not provably the query's
    assert find_attention(model.graph, model.opset_import) == [] and fuse_attention(model) == 0


def test_the_sd3_transformer_fuses_every_attention_and_keeps_its_output(tiny_sd3):
    """SD3's joint attention (and SD3.5's second, image-only attention) through the lean path: what optimize takes
    for a Q/DQ transformer or one too big for ONNX Runtime's optimizer. FLUX's heads are sized at run time (its
    graph's shapes are not inferred), so its attention is not found and its graph is left as it was."""
    import onnx

    from edgediff.bundle.reader import Bundle

    bundle = Bundle.open(tiny_sd3.bundle)
    model = onnx.load(str(bundle.model_path("transformer")))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    rng = np.random.default_rng(6)
    feeds = {}
    for spec in bundle.component("transformer").inputs:
        shape = [2 if d == "batch" else (8 if not isinstance(d, int) else d) for d in spec.shape]
        feeds[spec.name] = (rng.uniform(0, 1000, shape) if spec.name == "timestep"
                            else rng.standard_normal(shape)).astype(np.float32)
    expected = _run(model, feeds)
    assert softmaxes == 3 and fuse_attention(model) == softmaxes
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    for a, b in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_flux_attention_is_not_found(tiny_flux_dev):
    import onnx

    from edgediff.bundle.reader import Bundle

    model = onnx.load(str(Bundle.open(tiny_flux_dev.bundle).model_path("transformer")), load_external_data=False)
    nodes = len(model.graph.node)
    assert fuse_attention(model) == 0 and len(model.graph.node) == nodes
