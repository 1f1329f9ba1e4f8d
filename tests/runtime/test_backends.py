"""The Backend seam: factories get the Bundle they serve, and the optional Profiling capability (ONNX Runtime has it,
the native TensorRT backend does not). No GPU: the TensorRT backend is driven up to its cache lookup with a fake
tensorrt module and GPU description (tests/engines/test_trt_gpu.py runs the real thing where there is a GPU)."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from edgediff.backends import BACKENDS, PROFILING, open_backend, profiling_options
from edgediff.backends.base import profiler, supports_profiling
from edgediff.backends.ort import OrtBackend, OrtOptions, op_seconds
from edgediff.backends.tensorrt import device
from edgediff.backends.tensorrt.cache import EngineNotBuilt, default_engine_dir
from edgediff.bundle.reader import Bundle
from edgediff.errors import BackendError, InputError


@pytest.fixture
def fake_gpu(monkeypatch):
    """tensorrt and cuda-python as far as TrtBackend uses them before reading a plan."""
    monkeypatch.setattr(device, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(device, "cudart", lambda: object())
    monkeypatch.setattr(device, "gpu", lambda index=0: device.Gpu("Orin", "8.7", 8 << 30, 7 << 30, "12.6", "12.6"))


def test_trt_backend_serves_the_bundle_it_is_given_not_a_guess_from_the_graph_path(tiny_sd1_bundle, tmp_path,
                                                                                   fake_gpu):
    """The engine folder comes from the given bundle's digest and the rebuild hint names its root, wherever the
    graph path points (it used to be guessed as model_path.parent.parent, reopening whatever bundle was there)."""
    bundle = Bundle.open(tiny_sd1_bundle)
    elsewhere = tmp_path / "a" / "b" / "model.onnx"  # not inside any bundle
    with pytest.raises(EngineNotBuilt) as err:
        open_backend("trt", bundle, bundle.component("unet"), elsewhere)
    message = str(err.value)
    assert str(default_engine_dir(bundle.digest)) in message
    assert message.endswith(f"build it: edgediff build {bundle.root}")


def test_trt_backend_quotes_the_engine_dir_it_was_given(tiny_sd1_bundle, tmp_path, fake_gpu):
    from edgediff.backends.tensorrt import TrtOptions

    bundle = Bundle.open(tiny_sd1_bundle)
    with pytest.raises(EngineNotBuilt, match=f"edgediff build {bundle.root} --engine-dir {tmp_path}$"):
        open_backend("trt", bundle, bundle.component("unet"), bundle.model_path("unet"),
                     TrtOptions(engine_dir=str(tmp_path)))


def test_unknown_backend_lists_the_known_ones(tiny_sd1_bundle):
    bundle = Bundle.open(tiny_sd1_bundle)
    with pytest.raises(InputError, match=r"unknown backend 'onnx'; expected one of \['cpu', 'cuda', 'tensorrt', 'trt'\]"):
        open_backend("onnx", bundle, bundle.component("unet"), bundle.model_path("unet"))


# -- Profiling -------------------------------------------------------------------------------------------------
def test_profiling_options_are_backend_neutral_and_refused_for_the_native_trt_backend(tmp_path):
    opts = profiling_options("cpu", tmp_path)
    assert isinstance(opts, OrtOptions) and opts.enable_profiling
    assert Path(opts.profile_file_prefix).parent == tmp_path
    assert set(PROFILING) <= set(BACKENDS) and "trt" not in PROFILING
    with pytest.raises(InputError, match=r"backend 'trt' cannot profile operators; one that can: "
                                         r"cpu/cuda/tensorrt \(ONNX Runtime\)"):
        profiling_options("trt", tmp_path)
    with pytest.raises(InputError, match="unknown backend 'gpu'"):
        profiling_options("gpu", tmp_path)


def test_ort_backend_profiles_through_the_protocol(tiny_sd1_bundle, tmp_path):
    bundle = Bundle.open(tiny_sd1_bundle)
    comp = bundle.component("vae_decoder")
    backend = open_backend("cpu", bundle, comp, bundle.model_path("vae_decoder"), profiling_options("cpu", tmp_path))
    assert supports_profiling(backend) and isinstance(backend, OrtBackend)
    backend.run({"latent_sample": np.zeros((1, 4, 4, 4), np.float32)})
    by_op = profiler(backend).stop_profiling()
    assert by_op and all(isinstance(k, str) and v >= 0 for k, v in by_op.items())
    assert "Conv" in by_op and sum(by_op.values()) > 0
    assert list(tmp_path.glob("ort*.json"))  # the trace went where the options said


def test_stop_profiling_without_the_profiler_on_says_how_to_turn_it_on(tiny_sd1_bundle):
    bundle = Bundle.open(tiny_sd1_bundle)
    backend = open_backend("cpu", bundle, bundle.component("vae_decoder"), bundle.model_path("vae_decoder"))
    with pytest.raises(BackendError, match="the profiler was not on; open the backend with "
                                           r"edgediff.backends.profiling_options"):
        backend.stop_profiling()


def test_a_backend_without_the_capability_is_named():
    class Plain:
        component = "unet"

        def run(self, feeds):
            return {}

        def close(self):
            pass

    assert not supports_profiling(Plain())
    with pytest.raises(InputError, match=r"unet: Plain cannot profile operators; use an ONNX Runtime backend"):
        profiler(Plain())


def test_op_seconds_sums_kernel_time_per_operator_type():
    events = [
        {"cat": "Session", "name": "model_run", "dur": 999},
        {"cat": "Node", "name": "conv1_kernel_time", "dur": 1500, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv2_kernel_time", "dur": 500, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "conv2_fence_before", "dur": 7, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "mm_kernel_time", "dur": 250, "args": {"op_name": "MatMul"}},
    ]
    assert op_seconds(events) == {"Conv": 0.002, "MatMul": 0.00025}
