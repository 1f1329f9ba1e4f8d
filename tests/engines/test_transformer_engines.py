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


def test_quantize_defaults_to_the_transformer(tiny_sd3, tmp_path):
    from edgediff.engines.quantize import quantize_bundle

    out = quantize_bundle(tiny_sd3.bundle, tmp_path / "int8s", mode="int8-storage")
    comps = Bundle.open(out).manifest.components
    assert comps["transformer"].precision == "int8-storage" and comps["transformer"].parity.passed
    assert {n for n, c in comps.items() if c.precision != "fp32"} == {"transformer"}


def test_build_defaults_and_profiles_cover_the_transformer_families(tiny_sd3, tiny_flux_dev):
    from edgediff.engines.tensorrt.build import default_components
    from edgediff.engines.tensorrt.profiles import default_range, profile_shapes

    assert default_components(Bundle.open(tiny_sd3.bundle)) == ["text_encoder", "text_encoder_2", "text_encoder_3",
                                                                "transformer", "vae_decoder"]
    flux = Bundle.open(tiny_flux_dev.bundle)
    assert default_components(flux) == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    m = flux.manifest
    shapes = profile_shapes(m.components["transformer"], m, default_range(m, flux.size_multiple))
    # the exported graph's own specs: T5 tokens up to the bundle's limit, one batch per image (no CFG)
    assert shapes["encoder_hidden_states"][2][1] == m.max_sequence_length
    assert shapes["sample"][1][0] == 1 and shapes["guidance"][1] == (1,)


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux_dev"])
def test_the_conditioning_rule_keeps_adaln_and_the_embedders_float(which, request):
    import onnx

    from edgediff.engines.conditioning import conditioning_only

    graph = onnx.load(str(request.getfixturevalue(which).bundle / "transformer/model.onnx"))
    kept = conditioning_only(graph)
    every = [n.name for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")]
    adaln = [n for n in every if "/norm1/linear/" in n or "/norm1_context/linear/" in n or "/norm/linear/" in n]
    embedders = [n for n in every if "/time_text_embed/" in n or "/context_embedder/" in n]
    assert adaln and embedders and set(adaln + embedders) <= kept
    assert any("guidance_embedder" in n for n in kept) == (which == "tiny_flux_dev")
    assert not any("/attn/to_q/" in n or "/ff/" in n for n in kept)  # the image stream is quantized


def test_an_int8_sd3_transformer_runs_integer_with_fused_attention(tiny_sd3, tmp_path):
    """quantize --int8 (the TensorRT layout) then optimize --target cpu: ONNX Runtime's fusion finds no attention
    behind Q/DQ, so the transformer takes engines.attention_fusion (SD3's 4-D pattern), and every INT8 projection
    becomes an integer MatMul -- the q, k, v ones too, whose shared input stayed s8 before engines.qdq_uint8. The
    parity check runs at --size instead of the model's 1024x1024 default (the provenance says so)."""
    from edgediff.engines.quantize import quantize_bundle

    q = quantize_bundle(tiny_sd3.bundle, tmp_path / "i8", mode="int8", height=64, width=64, calib_size=2, steps=2,
                        tolerance=1.0)
    quantized = _ops(q / "transformer/model.onnx")
    messages = []
    out = optimize_bundle(q, tmp_path / "i8-cpu", target="cpu", height=64, width=64, progress=messages.append)
    after = _ops(out / "transformer/model.onnx")
    assert "transformer: Q/DQ graph; fusing attention from the graph's structure" in messages
    assert quantized["Softmax"] == 3 and after["Softmax"] == 0 and after["MultiHeadAttention"] == 3
    int8_matmuls = quantized["MatMul"] - 2 * quantized["Softmax"] - after["MatMul"]  # float ones: conditioning path
    assert int8_matmuls > 0 and after["QLinearMatMul"] == int8_matmuls
    b = Bundle.open(out)
    assert b.manifest.provenance.transforms[-1] == "optimize --target cpu --size 64x64"
    assert b.manifest.components["transformer"].parity.passed


def test_size_and_static_together_are_refused(tiny_sd3, tmp_path):
    from edgediff.errors import InputError

    with pytest.raises(InputError, match="--size with --static 1x64x64: the static size is the size the check runs"):
        optimize_bundle(tiny_sd3.bundle, tmp_path / "x", target="cpu", static=optimize.parse_static("1x64x64"),
                        height=64, width=64)
    assert not (tmp_path / "x").exists()
