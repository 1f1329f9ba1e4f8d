"""LoRA on TensorRT by refit (runtime/backends/tensorrt/refit.py).

On CPU: the weight bookkeeping (every refit from the base: a weight the previous LoRA changed goes back to its
base value; weights TensorRT folded together are supplied from the base), the names (what hot-swap computes is
keyed by the graph's initializer names, which TensorRT's ONNX parser gives its refittable weights), and
EngineRefit's use of the Refitter API, against a stand-in engine that keeps what a refit commits. On a GPU (marked
``gpu``): refittable engines of the tiny fixture, LoRA images against ONNX Runtime's, A -> B -> A exact.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgediff.backends.tensorrt.refit import EngineRefit, complete_plan, refit_plan
from edgediff.errors import EngineError

BASE = {n: np.full((2, 3), i, np.float32) for i, n in enumerate(["w0", "w1", "w2", "b2", "w3"])}


def base(name: str) -> np.ndarray:
    return BASE[name]


def test_each_plan_starts_from_the_base():
    a = {"w0": BASE["w0"] + 1, "w1": BASE["w1"] + 1}
    b = {"w1": BASE["w1"] + 2, "w2": BASE["w2"] + 2}
    plan = refit_plan(b, frozenset(a), base)  # A -> B: w0 back to base, w1 and w2 B's
    assert set(plan) == {"w0", "w1", "w2"}
    assert np.array_equal(plan["w0"], BASE["w0"]) and plan["w1"] is b["w1"] and plan["w2"] is b["w2"]
    plan = refit_plan({}, frozenset(b), base)  # B -> none: everything B changed, at its base value
    assert {n: float(v[0, 0]) for n, v in plan.items()} == {"w1": 1.0, "w2": 2.0}
    assert refit_plan(a, frozenset(), base).keys() == a.keys()


def test_missing_weights_come_from_the_base_and_a_refused_one_is_an_error():
    plan = {"w2": BASE["w2"] + 5}
    assert complete_plan(plan, ["b2"], base) == ["b2"] and np.array_equal(plan["b2"], BASE["b2"])
    with pytest.raises(EngineError, match="still needs weight 'w2'.*--refit --force"):
        complete_plan(plan, ["w2"], base)


def test_hot_swap_weights_are_keyed_by_the_graphs_initializer_names(tiny_sd1_source, tiny_sd1_bundle,
                                                                    tmp_path_factory):
    """The names TensorRT's ONNX parser gives refittable weights are the ONNX initializers' names: the weights
    hot-swap computes are keyed by them, in the initializers' layout, and are base + delta."""
    pytest.importorskip("peft")
    from lora_fixtures import make_lora

    from edgediff.bundle.reader import Bundle
    from edgediff.lora import lora_weights
    from edgediff.lora.formats import read_lora
    from edgediff.lora.onnx_weights import GraphWeights
    from edgediff.lora.weights_map import load_weights_map

    lora = make_lora(tiny_sd1_source, tmp_path_factory.mktemp("refit") / "a.safetensors", seed=4)
    b = Bundle.open(tiny_sd1_bundle)
    weights = lora_weights(b, {lora: 0.5})
    layers = {(x.component, x.module): x for x in read_lora(lora).layers}
    for component, arrays in weights.items():
        graph, wmap = GraphWeights(b.model_path(component)), load_weights_map(b, component)
        by_init = {e.initializer: (p, e) for p, e in wmap.weights.items()}
        assert set(arrays) <= set(graph.names())
        for name, a in arrays.items():
            assert a.shape == graph.info(name).shape and a.dtype == graph.info(name).dtype
            param, entry = by_init[name]
            layer = layers[(component, param[:-len(".weight")])]
            d = (layer.up.reshape(layer.up.shape[0], -1) @ layer.down.reshape(layer.rank, -1)).reshape(entry.shape)
            d = d * np.float32(0.5 * layer.scale)
            expect = graph.read(name) + (d.T if entry.transposed else d)
            assert np.allclose(a, expect, atol=1e-6), name
    assert len(weights["unet"]) > 0 and len(weights["text_encoder"]) > 0


# -- EngineRefit against a stand-in engine -----------------------------------------------------------------------
class _Weights:
    def __init__(self, a):
        self.array = np.array(a, copy=True)  # what TensorRT reads from the host pointer at refit time
        self.dtype, self.size = "FLOAT", self.array.size


class _Engine:
    """Holds named weights; ``groups`` are weights TensorRT folded together (set one, set them all)."""

    def __init__(self, refittable=True):
        self.refittable = refittable
        self.weights = {n: v.copy() for n, v in BASE.items()}
        self.groups = [{"w2", "b2"}]
        self.refits = 0


class _Refitter:
    def __init__(self, engine, logger):
        self.engine, self.pending = engine, {}

    def get_all_weights(self):
        return list(self.engine.weights)

    def get_weights_prototype(self, name):
        return SimpleNamespace(dtype="FLOAT", size=self.engine.weights[name].size)

    def set_named_weights(self, name, weights, location):
        assert location == "HOST"
        self.pending[name] = weights.array
        return True

    def get_missing_weights(self):
        return sorted(m for g in self.engine.groups if g & set(self.pending) for m in g - set(self.pending))

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        for n, a in self.pending.items():
            self.engine.weights[n] = a.reshape(self.engine.weights[n].shape)
        self.engine.refits += 1
        return True


FAKE_TRT = SimpleNamespace(Refitter=_Refitter, Weights=_Weights, nptype=lambda dt: np.float32,
                           TensorLocation=SimpleNamespace(HOST="HOST"),
                           Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}))


def test_a_b_a_leaves_exactly_a_in_the_engine():
    engine = _Engine()
    refit = EngineRefit(FAKE_TRT, engine, base, component="unet", rebuild="edgediff build B --force")
    a = {"w0": BASE["w0"] + 1, "w2": BASE["w2"] + 1}
    b = {"w1": BASE["w1"] + 7}
    refit.apply(a)
    after_a = {n: v.copy() for n, v in engine.weights.items()}
    assert np.array_equal(engine.weights["b2"], BASE["b2"])  # folded with w2: supplied from the base
    refit.apply(b)
    assert np.array_equal(engine.weights["w0"], BASE["w0"]) and np.array_equal(engine.weights["w2"], BASE["w2"])
    refit.apply(a)
    assert all(np.array_equal(engine.weights[n], after_a[n]) for n in BASE) and refit.changed == set(a)
    refit.apply({})
    assert all(np.array_equal(engine.weights[n], BASE[n]) for n in BASE) and engine.refits == 4


def test_engines_that_cannot_be_refitted_say_how_to_rebuild():
    with pytest.raises(EngineError, match="built without --refit.*edgediff build B --force --refit"):
        EngineRefit(FAKE_TRT, _Engine(refittable=False), base, component="unet", rebuild="edgediff build B --force")
    refit = EngineRefit(FAKE_TRT, _Engine(), base, component="unet", rebuild="edgediff build B --force")
    with pytest.raises(EngineError, match="no refittable weight 'onnx::MatMul_1'"):
        refit.apply({"onnx::MatMul_1": np.zeros(6, np.float32)})


# -- on a GPU ----------------------------------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    try:
        from edgediff.backends.tensorrt import device

        device.import_tensorrt()
        device.gpu()
    except Exception as exc:  # MissingDependency, or cuda-python without a driver/device
        return f"needs an NVIDIA GPU with TensorRT and cuda-python: {str(exc).splitlines()[0][:120]}"
    return None


@pytest.mark.gpu
def test_refit_engines_give_onnx_runtimes_lora_images_and_a_b_a_exactly(tiny_sd1_source, tiny_sd1_bundle,
                                                                          tmp_path_factory):
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("peft")
    from lora_fixtures import make_lora

    from edgediff.backends.tensorrt import TrtOptions
    from edgediff.engines.tensorrt.build import BuildOptions, build_engines
    from edgediff.engines.tensorrt.profiles import static_range
    from edgediff.pipeline import Pipeline

    d = tmp_path_factory.mktemp("trt_lora")
    a = make_lora(tiny_sd1_source, d / "a.safetensors", seed=1)
    b = make_lora(tiny_sd1_source, d / "b.safetensors", seed=2, text_encoder=False)
    fixed, refittable = d / "fixed", d / "refit"
    build_engines(tiny_sd1_bundle, BuildOptions(shape_range=static_range(1, 32, 32)), engine_dir=fixed)
    build_engines(tiny_sd1_bundle, BuildOptions(shape_range=static_range(1, 32, 32), refit=True), engine_dir=refittable)
    with pytest.raises(EngineError, match="built without --refit"):
        Pipeline.load(tiny_sd1_bundle, "trt", options=TrtOptions(engine_dir=str(fixed)), loras={a: 0.8})

    kw = dict(num_inference_steps=4, height=32, width=32, seed=3, output_type="np")
    with Pipeline.load(tiny_sd1_bundle, loras={a: 0.8}) as ort:
        ort_a = ort("a red circle", **kw).images[0]
    with Pipeline.load(tiny_sd1_bundle, "trt", options=TrtOptions(engine_dir=str(refittable)),
                       loras={a: 0.8}) as trt:
        trt_a = trt("a red circle", **kw).images[0]
        assert np.abs(trt_a - ort_a).max() <= 2 / 255  # TF32 convolutions on Ampere+
        trt.set_loras({b: 1.0})
        trt_b = trt("a red circle", **kw).images[0]
        trt.set_loras({a: 0.8})
        assert np.array_equal(trt("a red circle", **kw).images[0], trt_a)
        assert np.abs(trt_b - trt_a).max() > 0.05

        # in place, on one engine: A -> B -> A leaves A's weights (TensorRT #3628)
        from edgediff.backends.tensorrt.refit import refit_backend
        from edgediff.lora import lora_weights
        from edgediff.lora.onnx_weights import GraphWeights

        unet = trt.components.get("unet")
        path = trt.bundle.model_path("unet")
        wa, wb = lora_weights(trt.bundle, {a: 0.8})["unet"], lora_weights(trt.bundle, {b: 1.0})["unet"]
        refit_backend(unet, wb, GraphWeights(path).read, rebuild="edgediff build")
        refit_backend(unet, wa, GraphWeights(path).read, rebuild="edgediff build")
        assert np.array_equal(trt("a red circle", **kw).images[0], trt_a)
