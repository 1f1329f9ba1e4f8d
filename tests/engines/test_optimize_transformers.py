"""edgediff optimize on the transformer families (tiny random SD3 and FLUX.1-dev bundles, tests/sdxl_fixtures.py):
the SD3 transformer's joint attention becomes ONNX Runtime's MultiHeadAttention (no score matrix in memory), FLUX's
T5 gets no CLIP recipe, every derived graph passes its parity check and the images stay those of the exported
bundle; ONNX Runtime's optimizer prints nothing of its own. (FLUX's attention, whose rotary embedding ONNX Runtime's
MMDiT pattern does not match in our export, keeps its MatMul-Softmax-MatMul: the recipe choice is checked below and
every derived graph's parity by engines.derive.)"""
from __future__ import annotations

import collections

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.engines import optimize
from edgediff.engines.optimize import optimize_bundle
from edgediff.pipeline import Pipeline

pytest.importorskip("diffusers")


def _ops(path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_sd3_attention_is_fused_checked_and_quiet(tiny_sd3, tmp_path, capfd):
    out = optimize_bundle(tiny_sd3.bundle, tmp_path / "sd3-cpu", target="cpu")
    err = capfd.readouterr().err
    # ONNX Runtime's optimizer's own chatter (progress bars, symbolic shape inference, "use onnxruntime-gpu")
    assert "fusion:" not in err and "Cannot determine" not in err and "onnxruntime-gpu" not in err
    before, after = _ops(tiny_sd3.bundle / "transformer/model.onnx"), _ops(out / "transformer/model.onnx")
    assert before["Softmax"] == 3 and before["MultiHeadAttention"] == 0  # 2 joint blocks + 1 dual-attention block
    assert after["MultiHeadAttention"] == 3 and after["Softmax"] == 0
    assert after["FastGelu"] > 0 and after["SimplifiedLayerNormalization"] > 0  # GELU-tanh and RMS (qk) norms
    b = Bundle.open(out)
    assert b.verify() == []
    receipt = b.manifest.components["transformer"].parity
    assert receipt.passed and receipt.max_rel <= 1e-3 and b.manifest.components["transformer"].optimized_for == "cpu"
    kw = dict(num_inference_steps=3, seed=3, output_type="np", guidance_scale=4.0)
    with Pipeline.load(tiny_sd3.bundle) as p0, Pipeline.load(out) as p1:
        a, b = p0("a red circle", **kw).images[0], p1("a red circle", **kw).images[0]
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("family, name, expected", [
    ("flux", "text_encoder_2", None), ("sdxl", "text_encoder_2", "clip"), ("sd3", "text_encoder_3", None),
    ("sd3", "transformer", "mmdit"), ("flux", "transformer", "mmdit"), ("sd1", "unet", "unet")])
def test_recipe_per_component_and_family(family, name, expected, monkeypatch):
    seen = []

    def fake_optimize_model(model, model_type, **kw):  # records which recipe _fuse picks
        seen.append(model_type)
        return type("Fused", (), {"model": model})()

    monkeypatch.setattr("onnxruntime.transformers.optimizer.optimize_model", fake_optimize_model)
    assert optimize._fuse("graph", name, "cpu", family) == "graph"
    assert seen == ([expected] if expected else [])
