"""TensorRT on a real GPU: build the tiny fixture's engines, TRT-vs-ORT parity on latents, CUDA-graph replay
equality, and refusal of an engine built for another GPU. Skipped (with the reason) where there is no NVIDIA GPU
with TensorRT and cuda-python -- which is every machine this project has had so far."""
from __future__ import annotations

import json

import numpy as np
import pytest


def _gpu_reason() -> str | None:
    try:
        from edgediff.backends.tensorrt import device

        device.import_tensorrt()
        device.gpu()
    except Exception as exc:  # MissingDependency, or cuda-python without a driver/device
        return f"needs an NVIDIA GPU with TensorRT and cuda-python: {str(exc).splitlines()[0][:120]}"
    return None


REASON = _gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def engines(tiny_sd1_bundle, tmp_path_factory):
    from edgediff.engines.tensorrt.build import BuildOptions, build_engines
    from edgediff.engines.tensorrt.profiles import static_range

    d = tmp_path_factory.mktemp("engines")
    build_engines(tiny_sd1_bundle, BuildOptions(shape_range=static_range(1, 32, 32)), engine_dir=d)
    return d


def test_trt_matches_onnx_runtime_on_latents(tiny_sd1_bundle, engines):
    from edgediff.backends.tensorrt import TrtOptions
    from edgediff.pipeline import Pipeline

    kw = dict(num_inference_steps=4, height=32, width=32, seed=3, output_type="np")
    with Pipeline.load(tiny_sd1_bundle) as ort, Pipeline.load(tiny_sd1_bundle, "trt",
                                                               options=TrtOptions(engine_dir=str(engines))) as trt:
        lat = {}
        for name, p in (("ort", ort), ("trt", trt)):
            p("a red circle", callback=lambda i, n, t, x: lat.__setitem__((name, i), x.copy()), **kw)
    for i in range(1, 5):
        a, b = lat[("ort", i)], lat[("trt", i)]
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-2  # TF32 convolutions on Ampere+


def test_cuda_graph_replay_equals_plain_enqueue(tiny_sd1_bundle, engines):
    from edgediff.backends.tensorrt import TrtOptions
    from edgediff.pipeline import Pipeline

    kw = dict(num_inference_steps=3, height=32, width=32, seed=1, output_type="np")
    with Pipeline.load(tiny_sd1_bundle, "trt", options=TrtOptions(engine_dir=str(engines))) as p0, \
         Pipeline.load(tiny_sd1_bundle, "trt", options=TrtOptions(engine_dir=str(engines), cuda_graph=True)) as p1:
        a, b = p0("a blue square", **kw).images[0], p1("a blue square", **kw).images[0]
    assert np.array_equal(a, b)


def test_engine_for_another_gpu_is_refused(tiny_sd1_bundle, engines):
    from edgediff.backends.tensorrt import TrtOptions
    from edgediff.errors import EngineIncompatible
    from edgediff.pipeline import Pipeline

    for meta in engines.glob("unet-*.meta.json"):
        data = json.loads(meta.read_text())
        data["key"]["gpu"] = "Some Other GPU"
        meta.write_text(json.dumps(data))
    with pytest.raises(EngineIncompatible, match="Some Other GPU"):
        Pipeline.load(tiny_sd1_bundle, "trt", options=TrtOptions(engine_dir=str(engines)))
