"""engines.calibrate: the INT8 ranges it computes are ONNX Runtime's own calibrator's, from one copy of the weights;
the quantizer reads them as its calibration cache and writes the same Q/DQ graph either way."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.engines import calibrate
from edgediff.engines.graphs import EXTERNAL_DATA_NAME
from edgediff.engines.probe import capture

from external_data import external_copy

OPS = ("Conv", "MatMul", "Gemm")


@pytest.fixture(scope="module")
def unet_feeds(tiny_sd1_bundle):
    return capture(tiny_sd1_bundle, ["a red circle", "a blue square"], steps=2, seed=3).feeds["unet"]


@pytest.fixture(scope="module")
def external(tiny_sd1_bundle, tmp_path_factory):
    return external_copy(tiny_sd1_bundle, tmp_path_factory.mktemp("ext") / "bundle")


def _ort_ranges(graph, feeds, work):
    """What ``quantize_static`` would calibrate: ONNX Runtime's MinMax calibrator, symmetric."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    class Reader:
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    cal = create_calibrator(str(graph), list(OPS), augmented_model_path=str(work / "augmented.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    cal.collect_data(Reader())
    return {k: float(v.range_value[1][0]) for k, v in cal.compute_data().items()}


def test_ranges_are_onnx_runtime_s_calibrator_s(tiny_sd1_bundle, unet_feeds, tmp_path):
    graph = tiny_sd1_bundle / "unet" / "model.onnx"
    ours = calibrate.absmax(graph, unet_feeds, OPS, tmp_path / "ours")
    theirs = _ort_ranges(graph, unet_feeds, tmp_path)
    assert set(ours) == set(theirs) and len(ours) > 50
    for name, m in theirs.items():
        assert ours[name] == pytest.approx(m, rel=1e-6, abs=0), name
    assert all(m > 0 for m in ours.values())


def test_weights_stay_on_disk_linked_not_copied(tiny_sd1_bundle, external, unet_feeds, tmp_path):
    """A graph with external data (every graph over 2 GB) is calibrated beside a hard link to its weights file, with
    the ranges of the same graph kept inline."""
    import os

    graph = external / "unet" / "model.onnx"
    links = []
    real_link = os.link

    def link(src, dst):
        real_link(src, dst)
        links.append((os.stat(dst).st_ino, os.stat(src).st_ino))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "link", link)
        ours = calibrate.absmax(graph, unet_feeds, OPS, tmp_path)
    assert links and links[0][0] == (graph.parent / EXTERNAL_DATA_NAME).stat().st_ino == links[0][1]
    # and the link is gone afterwards: onnx.load refuses a weights file with several links
    assert not (tmp_path / "calibration").exists() and (graph.parent / EXTERNAL_DATA_NAME).stat().st_nlink == 1
    assert ours == calibrate.absmax(tiny_sd1_bundle / "unet" / "model.onnx", unet_feeds, OPS, tmp_path / "inline")


def test_the_cache_file_round_trips(tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, load_tensors_data

    if not calibrate.cache_supported():
        pytest.skip("this onnxruntime's quantize_static reads no calibration cache")
    path = calibrate.write_cache({"a": 2.5, "b": 0.125}, tmp_path / "c.json")
    data = load_tensors_data(path)
    assert data.calibration_method == CalibrationMethod.MinMax
    assert [(k, float(v.range_value[0][0]), float(v.range_value[1][0])) for k, v in sorted(data.items())] == \
        [("a", -2.5, 2.5), ("b", -0.125, 0.125)]


def test_quantizer_writes_the_same_graph_from_either_calibration(tiny_sd1_bundle, unet_feeds, tmp_path, monkeypatch):
    """quantize's INT8 path with the cache (our ranges) and without it (ONNX Runtime calibrating): same Q/DQ."""
    import onnx
    from onnx import numpy_helper

    from edgediff.engines import quantize as q

    if not calibrate.cache_supported():
        pytest.skip("this onnxruntime's quantize_static reads no calibration cache")
    graph = tiny_sd1_bundle / "unet" / "model.onnx"
    graphs = {}
    for cached in (True, False):
        monkeypatch.setattr(calibrate, "cache_supported", lambda c=cached: c)
        work = tmp_path / str(cached)
        work.mkdir()
        clean = q._cleaned(graph, work)
        cache = q._calibrated(clean, unet_feeds, work)
        assert (cache is not None) == cached
        graphs[cached] = onnx.load(str(q._static_graph(clean, unet_feeds, "unet", work, fp8=False, cache=cache)))
    a, b = ({t.name: numpy_helper.to_array(t) for t in g.graph.initializer} for g in (graphs[True], graphs[False]))
    assert [n.op_type for n in graphs[True].graph.node] == [n.op_type for n in graphs[False].graph.node]
    assert set(a) == set(b)
    scales = [k for k in a if k.endswith("_scale")]
    assert len(scales) > 50
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


def test_no_feeds_or_nothing_to_calibrate_is_one_line(tiny_sd1_bundle, unet_feeds, tmp_path):
    from edgediff.errors import EngineError

    graph = tiny_sd1_bundle / "unet" / "model.onnx"
    with pytest.raises(EngineError, match="no calibration inputs"):
        calibrate.absmax(graph, [], OPS, tmp_path / "a")
    with pytest.raises(EngineError, match="no LSTM activation to calibrate"):
        calibrate.absmax(graph, unet_feeds, ("LSTM",), tmp_path / "b")
