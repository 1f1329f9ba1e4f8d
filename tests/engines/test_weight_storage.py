"""INT8 weight storage: the rewrite on a hand-made graph (which weights, which axis, names kept, numerics), and
``quantize --int8-storage`` on the tiny fixture as exported and after ``optimize --target cpu``."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.engines import qdq_rules
from edgediff.engines.optimize import optimize_bundle
from edgediff.engines.quantize import quantize_bundle
from edgediff.engines.weight_storage import quantize_weight, store_weights_int8
from edgediff.errors import EngineError
from edgediff.pipeline import Pipeline


def test_quantize_weight_is_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    w[2] = 0.0
    q, scale = quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (6,) and q.min() >= -127
    assert scale[2] == 1.0 and not q[2].any()  # an all-zero channel: positive scale, zero codes
    amax = np.abs(w).reshape(6, -1).max(axis=1)
    assert np.allclose(scale[amax > 0], amax[amax > 0] / 127)
    err = np.abs(q * scale[:, None, None, None] - w)
    assert (err <= scale[:, None, None, None] / 2 + 1e-7).all()  # round to nearest
    _, s1 = quantize_weight(w.reshape(6, 27).T.copy(), axis=1)  # a K x N MatMul weight: one scale per column
    assert np.allclose(s1, scale)


def _graph(opset=17):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    conv_w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)  # 1152 elements
    mm_w = rng.standard_normal((64, 96)).astype(np.float32)
    gemm_w = rng.standard_normal((32, 96)).astype(np.float32)  # used transposed: [N, K]
    bias = rng.standard_normal(32).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),  # [1, 16 * 2 * 2 = 64]
        helper.make_node("MatMul", ["f", "mm_w"], ["m"]),
        helper.make_node("Gemm", ["m", "gemm_w", "bias"], ["y"], transB=1),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(a, n) for a, n in
         ((conv_w, "conv_w"), (mm_w, "mm_w"), (gemm_w, "gemm_w"), (bias, "bias"))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_rewrite_keeps_names_and_numerics():
    from onnx import TensorProto, checker

    model = _graph()
    x = np.random.default_rng(2).standard_normal((1, 8, 2, 2)).astype(np.float32)
    expected = _run(model, x)
    stored = store_weights_int8(model, min_elements=1000)
    checker.check_model(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert stored.tensors == 3 and stored.bytes_after < stored.bytes_before / 3
    assert {"conv_w", "mm_w", "gemm_w"}.isdisjoint(inits) and inits["bias"].data_type == TensorProto.FLOAT
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert {k: dq[k].attribute[0].i for k in dq} == {"conv_w": 0, "mm_w": 1, "gemm_w": 0}  # output-channel axes
    assert all(inits[n.input[0]].data_type == TensorProto.INT8 for n in dq.values())
    assert qdq_rules.violations(model, "int8") == []
    got = _run(model, x)
    rel_l2 = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 0 < rel_l2 < 0.02  # the weights were rounded, nothing else changed


def test_small_weights_and_old_opsets_are_left_alone():
    model = _graph()
    assert store_weights_int8(model).tensors == 1  # default threshold 4096: only the 64 x 96 MatMul weight
    assert {"conv_w", "gemm_w", "bias"} <= {t.name for t in model.graph.initializer}
    with pytest.raises(EngineError, match="opset 11; per-channel DequantizeLinear needs opset >= 13"):
        store_weights_int8(_graph(opset=11))


def test_fused_attention_weights_are_stored_too():
    """ONNX Runtime's fused self-attention (com.microsoft Attention) holds the packed QKV weight [H, 3H]: 16 such
    weights are 149 MB of an optimized SD-1.5 UNet."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 192)).astype(np.float32) * 0.1
    b = np.zeros(192, np.float32)
    g = helper.make_graph([helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=4)],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 64])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = run(model)
    assert store_weights_int8(model).tensors == 1
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert dq.output[0] == "w" and dq.attribute[0].i == 1
    got = run(model)
    assert 0 < np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.02


@pytest.fixture(scope="module")
def cpu_opt(tiny_sd1_bundle, tmp_path_factory):
    return optimize_bundle(tiny_sd1_bundle, tmp_path_factory.mktemp("opt") / "cpu", target="cpu")


@pytest.mark.parametrize("parent", ["exported", "optimized"])
def test_int8_storage_bundle(parent, tiny_sd1_bundle, cpu_opt, tmp_path):
    import onnx

    src = tiny_sd1_bundle if parent == "exported" else cpu_opt
    out = quantize_bundle(src, tmp_path / "i8s", mode="int8-storage", steps=3)
    b, before = Bundle.open(out), Bundle.open(src)
    assert b.verify() == []
    unet = b.component("unet")
    assert unet.precision == "int8-storage" and unet.parity.metric == "rel_l2" and unet.parity.passed
    assert unet.optimized_for == before.component("unet").optimized_for  # fused graphs stay fused
    assert unet.size < before.component("unet").size / 2
    assert b.component("vae_decoder").precision == "fp32"
    ops = [n.op_type for n in onnx.load(str(out / "unet/model.onnx")).graph.node]
    assert ops.count("DequantizeLinear") > 10 and "QuantizeLinear" not in ops  # activations stay fp32
    kw = dict(num_inference_steps=3, seed=3, output_type="np")
    with Pipeline.load(src) as p0, Pipeline.load(out, low_memory=True) as p1:
        a, c = p0("a blue square", **kw).images[0], p1("a blue square", **kw).images[0]
    assert np.isfinite(c).all() and 0 < np.abs(a - c).mean() < 0.05
