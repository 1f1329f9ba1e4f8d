"""export/external_data.py: torch's one-file-per-tensor external data gathered into one model.onnx_data by copying
bytes. Reference: the same graph with its weights inside, run by ONNX Runtime (CPU); outputs must be identical."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgediff.errors import ExportError
from edgediff.export.external_data import gather_external_data, has_external_data


def _graph() -> onnx.ModelProto:
    """y = (x @ W + b) * c, with W and b initializers and c a Constant node's tensor attribute (all > 1 KiB)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "b")
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(rng.standard_normal((2, 48)).astype(np.float32) * 3, "cv"))
    nodes = [c, helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Mul", ["h", "c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])], initializer=[w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(path) -> np.ndarray:
    import onnxruntime as ort

    x = np.arange(128, dtype=np.float32).reshape(2, 64) / 100
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _torch_like(tmp_path):
    """Saved as torch.onnx.export saves a model over 2 GiB: the graph plus one file per tensor."""
    raw = tmp_path / "_raw"
    raw.mkdir()
    model = _graph()
    onnx.save_model(model, str(raw / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    return raw


def test_gathered_graph_runs_identically_and_holds_two_files(tmp_path):
    onnx.save_model(_graph(), str(tmp_path / "inline.onnx"))
    raw = _torch_like(tmp_path)
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    assert has_external_data(model) and not has_external_data(_graph())
    out = tmp_path / "out"
    out.mkdir()
    gather_external_data(model, raw, out / "model.onnx_data")
    onnx.save_model(model, str(out / "model.onnx"))
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert (out / "model.onnx_data").stat().st_size == 4 * (64 * 48 + 48 + 2 * 48)  # every tensor, once
    np.testing.assert_array_equal(_run(out / "model.onnx"), _run(tmp_path / "inline.onnx"))


def test_location_outside_the_export_folder_is_refused(tmp_path):
    raw = _torch_like(tmp_path)
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "location")
    entry.value = "../elsewhere"
    with pytest.raises(ExportError, match="is not a file of"):
        gather_external_data(model, raw, tmp_path / "data")


def test_short_tensor_file_is_refused(tmp_path):
    raw = _torch_like(tmp_path)
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    location = next(e.value for e in model.graph.initializer[0].external_data if e.key == "location")
    (raw / location).write_bytes((raw / location).read_bytes()[:100])
    with pytest.raises(ExportError, match="ends .* bytes early"):
        gather_external_data(model, raw, tmp_path / "data")


def test_exporter_gathers_what_torch_writes_for_a_model_over_2_gib(tmp_path, monkeypatch):
    """pipeline_export._export_graph on torch's over-2-GiB layout (simulated on a small module): one graph and one
    model.onnx_data, read without loading the tensors (onnx.load never asked for external data)."""
    import torch

    from edgediff.export import pipeline_export
    from edgediff.export.components import ComponentExport

    real_export, real_load = torch.onnx.export, onnx.load

    def export_as_over_2gib(module, args, f, **kwargs):
        real_export(module, args, f, **kwargs)
        onnx.save_model(real_load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    def load_without_weights(f, *args, **kwargs):
        assert kwargs.get("load_external_data") is False, "the exporter loaded the weights a second time"
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_as_over_2gib)
    monkeypatch.setattr(onnx, "load", load_without_weights)
    module = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 8)).eval()
    spec = ComponentExport("mlp", ("x",), ("y",), {"x": {0: "batch"}, "y": {0: "batch"}}, None, None)
    path = tmp_path / "mlp" / "model.onnx"
    path.parent.mkdir()
    pipeline_export._export_graph(module, (torch.randn(2, 64),), spec, path, 17)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    import onnxruntime as ort

    x = torch.randn(3, 64)
    with torch.no_grad():
        want = module(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
