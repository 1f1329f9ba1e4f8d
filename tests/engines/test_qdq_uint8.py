"""Activation Q/DQ pairs as uint8 (engines.qdq_uint8): the same values exactly, and an input shared by several INT8
projections now reaches ONNX Runtime's integer MatMul (it stayed a dequantized float MatMul before)."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from edgediff.engines.qdq_uint8 import activations_to_uint8

N, K, M = 4, 16, 8  # rows, features in, features out


def _shared_input_graph(*, zp: int = 3, extra_zp_use: bool = False):
    """x -> Q(s8) -> DQ -> three MatMuls with INT8 weights (q, k, v of one attention), each output Q/DQ'd: the
    layout quantize --int8 writes for an attention's projections. ``extra_zp_use``: the zero point also feeds an Add."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(zp, np.int8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"])]
    outputs = []
    for p in "qkv":
        w = rng.integers(-20, 20, (K, M)).astype(np.int8)
        inits += [numpy_helper.from_array(w, f"w_{p}"),
                  numpy_helper.from_array(np.full(M, 0.01, np.float32), f"w_{p}_scale"),
                  numpy_helper.from_array(np.zeros(M, np.int8), f"w_{p}_zp"),
                  numpy_helper.from_array(np.array(0.05, np.float32), f"{p}_scale"),
                  numpy_helper.from_array(np.array(-2, np.int8), f"{p}_zp")]
        nodes += [helper.make_node("DequantizeLinear", [f"w_{p}", f"w_{p}_scale", f"w_{p}_zp"], [f"w_{p}_dq"], axis=1),
                  helper.make_node("MatMul", ["x_dq", f"w_{p}_dq"], [f"{p}_mm"]),
                  helper.make_node("QuantizeLinear", [f"{p}_mm", f"{p}_scale", f"{p}_zp"], [f"{p}_q"]),
                  helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_scale", f"{p}_zp"], [p])]
        outputs.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, None))
    if extra_zp_use:
        nodes.append(helper.make_node("Cast", ["x_zp"], ["zp_f"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info("zp_f", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "projections", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, K])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _fused_ops(model, tmp_path) -> collections.Counter:
    """The op counts of ``model`` after ONNX Runtime's extended optimizations (what optimize --target cpu saves)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "saved.onnx")).graph.node)


def test_the_same_values_exactly():
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32) * 3  # some values clamp
    model = _shared_input_graph()
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ computed as written: exact arithmetic of the format
    before = _session(model, plain).run(None, {"x": x})
    assert activations_to_uint8(model) == 4  # x and the three outputs
    zps = {t.name: t for t in model.graph.initializer}
    assert zps["x_zp"].data_type == 2 and zps["q_zp"].data_type == 2 and zps["w_q_zp"].data_type == 3  # weights stay s8
    after = _session(model, plain).run(None, {"x": x})
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


def test_a_shared_input_reaches_the_integer_matmul(tmp_path):
    model = _shared_input_graph()
    assert _fused_ops(model, tmp_path)["QLinearMatMul"] == 0  # ONNX Runtime leaves s8 x shared by three: float MatMuls
    activations_to_uint8(model)
    ops = _fused_ops(model, tmp_path)
    assert ops["QLinearMatMul"] == 3 and ops["MatMul"] == 0


@pytest.mark.parametrize("case", ["other_use", "external", "weights_only"])
def test_zero_points_it_cannot_prove_are_left_alone(case):
    from onnx import TensorProto

    model = _shared_input_graph(extra_zp_use=case == "other_use")
    zps = {t.name: t for t in model.graph.initializer}
    if case == "external":  # a zero point outside the graph file is not read
        t = zps["x_zp"]
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("int32_data")
        t.external_data.add(key="location", value="weights.bin")
    converted = activations_to_uint8(model)
    if case == "weights_only":
        assert {n for n, t in zps.items() if t.data_type == 2} == {"x_zp", "q_zp", "k_zp", "v_zp"}
    else:
        assert converted == 3 and zps["x_zp"].data_type == 3
