"""engines.graphs helpers for graphs whose weights live in an external-data file."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.engines.graphs import EXTERNAL_DATA_NAME, adopt_external_data, load_model_qparams
from edgediff.errors import EngineError


def _qdq_graph():
    """x -> Q -> DQ -> MatMul(DQ(w_int8)) with per-channel scales: every tensor big enough to be saved outside."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(32, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(32, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, path, location):
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def test_another_tool_s_data_file_is_renamed_and_the_graph_still_runs(tmp_path):
    import onnxruntime as ort

    path = tmp_path / "q" / "model.onnx"
    _save(_qdq_graph(), path, "model.onnx.data")  # onnxruntime.quantization's name
    x = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    (before,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    assert adopt_external_data(path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", EXTERNAL_DATA_NAME]
    (after,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    np.testing.assert_array_equal(after, before)
    assert adopt_external_data(path) == path  # already the bundle's name: nothing to do


def test_two_data_files_are_refused(tmp_path):
    import onnx

    model = _qdq_graph()
    path = tmp_path / "model.onnx"
    _save(model, path, "a.data")
    model = onnx.load(str(path), load_external_data=False)
    for e in model.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "b.data"
    onnx.save(model, str(path))
    with pytest.raises(EngineError, match="weights in 2 external files"):
        adopt_external_data(path)


def test_qparams_are_read_and_weights_are_not(tmp_path):
    from onnx import TensorProto, numpy_helper

    path = tmp_path / "model.onnx"
    _save(_qdq_graph(), path, EXTERNAL_DATA_NAME)
    model = load_model_qparams(path)
    by_name = {t.name: t for t in model.graph.initializer}
    assert by_name["w"].data_location == TensorProto.EXTERNAL  # the weight stays on disk
    for name in ("w_scale", "w_zp", "x_scale", "x_zp"):
        assert by_name[name].data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(by_name["w_scale"]), np.full(32, 0.01, np.float32))
