"""optimize / quantize / build on the tiny random SDXL base and refiner bundles (tests/sdxl_fixtures.py): static
shapes fix the added denoiser inputs, calibration runs both text encoders (and the refiner as img2img), the
add-embedding layers stay float under INT8/FP8, --fp16 covers text_encoder_2, TensorRT profiles follow the batch;
each derived bundle generates close to its fp32 parent. (TensorRT itself needs a GPU: tests/engines/test_trt_gpu.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.engines import qdq_rules
from edgediff.engines.conditioning import conditioning_only
from edgediff.pipeline import Pipeline

pytest.importorskip("diffusers")

from sdxl_fixtures import tiny_sdxl  # noqa: E402

FAST = dict(calib_size=2, steps=3)
PROMPT = "a red circle"
# the layers SDXL's denoiser computes from the conditioning alone: they must stay float (engines/conditioning.py)
CONDITIONING_LAYERS = ("add_embedding/linear_1/", "add_embedding/linear_2/", "time_embedding/linear_1/",
                       "time_embedding/linear_2/", "time_emb_proj/", "attn2/to_k/", "attn2/to_v/")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory, "tiny-sdxl").bundle


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory, "tiny-sdxl-refiner").bundle


def _onnx(path):
    import onnx

    return onnx.load(str(path))


def _images(parent, derived, **kw):
    """The same call on both bundles (16x16: the tiny models' native size); the refiner refines a fixed picture."""
    from edgediff.engines.probe import calibration_image

    kw = dict(num_inference_steps=4, seed=5, output_type="np", **kw)
    if Bundle.open(parent).manifest.family == "sdxl-refiner":
        kw.update(image=calibration_image(11, 16, 16), strength=0.5)
    with Pipeline.load(parent) as p0, Pipeline.load(derived) as p1:
        return p0(PROMPT, **kw).images[0], p1(PROMPT, **kw).images[0]


def _float_weights(model, names):
    """The nodes ``names`` of ``model`` whose weight is not produced by a node (a float initializer, no Q/DQ)."""
    producers = {o for n in model.graph.node for o in n.output}
    return [n for n in model.graph.node if n.name in names and n.input[1] not in producers]


# -- capture: what calibration and parity see ------------------------------------------------------------------
def test_capture_runs_both_text_encoders_and_feeds_the_added_inputs(base):
    from edgediff.engines.probe import capture

    got = capture(base, ["a cat", "a dog"], steps=2, seed=0)
    assert got.count("text_encoder") == got.count("text_encoder_2") == 2
    unet = got.feeds["unet"]
    assert len(unet) == 4 and set(unet[0]) == {"sample", "timestep", "encoder_hidden_states", "text_embeds",
                                               "time_ids"}
    # SDXL's own guidance (5.0) by default: [uncond; cond] rows, the uncond ones zero (force_zeros_for_empty_prompt)
    assert unet[0]["text_embeds"].shape == (2, 24) and unet[0]["time_ids"].shape == (2, 6)
    assert not unet[0]["text_embeds"][0].any() and unet[0]["text_embeds"][1].any()
    np.testing.assert_array_equal(unet[0]["time_ids"], [[16, 16, 0, 0, 16, 16]] * 2)


def test_capture_follows_the_bundle_s_guidance(base, tmp_path):
    """A Turbo bundle (recorded guidance 0) runs its denoiser unguided, at batch 1: calibration used a fixed 7.5 and
    so calibrated on [uncond; cond] batches the bundle never runs."""
    import dataclasses
    import shutil

    from edgediff.bundle.manifest import GenerationDefaults
    from edgediff.bundle.writer import write_manifest
    from edgediff.engines.probe import capture

    turbo = shutil.copytree(base, tmp_path / "turbo")
    m = Bundle.open(turbo).manifest
    write_manifest(turbo, dataclasses.replace(m, defaults=GenerationDefaults(steps=1, guidance_scale=0.0)))
    got = capture(turbo, ["a cat"], steps=1)
    assert [f["sample"].shape[0] for f in got.feeds["unet"]] == [1]
    assert got.feeds["unet"][0]["text_embeds"].shape == (1, 24)


def test_a_refiner_is_captured_as_img2img_at_its_low_noise_timesteps(refiner):
    """The refiner has no text-to-image; calibration used to die on its refusal. It now refines a picture over the
    last 30 % of the schedule, diffusers' refiner strength."""
    from edgediff.engines.probe import REFINER_STRENGTH, capture, refiner_strength

    got = capture(refiner, ["a cat"], steps=10, seed=0)
    unet = got.feeds["unet"]
    assert len(unet) == 3 and got.count("vae_encoder") == 1 and "text_encoder" not in got.feeds
    assert max(float(f["timestep"].max()) for f in unet) < 300  # of 1000 training timesteps
    assert unet[0]["time_ids"].shape == (2, 5)  # aesthetic score instead of the target size
    for steps in range(1, 60):  # the pipeline runs int(steps * strength) steps: at least one, else diffusers' share
        assert int(steps * refiner_strength(steps)) == max(1, int(steps * REFINER_STRENGTH)), steps


# -- optimize --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_cpu(base, tmp_path_factory):
    from edgediff.engines.optimize import optimize_bundle, parse_static

    return optimize_bundle(base, tmp_path_factory.mktemp("sdxl-opt") / "static", target="cpu",
                           static=parse_static("1x16x16"))


def test_static_optimize_fixes_the_added_denoiser_inputs(static_cpu, base):
    """text_embeds and time_ids kept a dynamic batch under --static: the denoiser was not static."""
    b = Bundle.open(static_cpu)
    assert b.verify() == [] and b.manifest.family == "sdxl"
    unet = b.component("unet")
    assert {s.name: s.shape for s in unet.inputs} == {
        "sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 80), "text_embeds": (2, 24),
        "time_ids": (2, 6)}
    for name in ("text_encoder", "text_encoder_2"):  # both towers kept, batch dynamic, fused for cpu
        comp = b.component(name)
        assert comp.input("input_ids").shape[0] == "batch" and comp.optimized_for == "cpu" and comp.parity.passed
        assert (static_cpu / name / "model.onnx").is_file()
    assert all(c.parity.max_rel <= 1e-3 for c in b.manifest.components.values())
    ops = [n.op_type for n in _onnx(static_cpu / "unet/model.onnx").graph.node]
    assert ops.count("Attention") + ops.count("MultiHeadAttention") > 0  # attention fused for the CPU
    a, b_ = _images(base, static_cpu)
    assert np.abs(a - b_).max() < 1e-3


def test_int8_storage_applies_after_optimize(static_cpu, tmp_path):
    from edgediff.engines.quantize import quantize_bundle

    out = quantize_bundle(static_cpu, tmp_path / "storage", mode="int8-storage")
    unet = Bundle.open(out).component("unet")
    assert unet.precision == "int8-storage" and unet.optimized_for == "cpu" and unet.parity.passed
    a, b = _images(static_cpu, out)
    assert np.abs(a - b).max() < 0.05


# -- quantize --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_the_graph_rule_finds_the_add_embedding_layers(tmp_path_factory, preset):
    unet = _onnx(tiny_sdxl(tmp_path_factory, preset).bundle / "unet/model.onnx")
    cond = conditioning_only(unet)
    for part in CONDITIONING_LAYERS:
        assert any(part in n for n in cond), part
    assert sum("add_embedding/" in n for n in cond) == 2
    assert not [n for n in cond if any(p in n for p in ("attn1/", "attn2/to_q", "attn2/to_out", "conv", "ff."))]


@pytest.mark.parametrize("preset, mode", [("tiny-sdxl", "int8"), ("tiny-sdxl-refiner", "fp8")])
def test_calibrated_quantization_keeps_the_conditioning_float(tmp_path_factory, tmp_path, preset, mode):
    from edgediff.engines.quantize import quantize_bundle

    parent = tiny_sdxl(tmp_path_factory, preset).bundle
    out = quantize_bundle(parent, tmp_path / mode, mode=mode, tolerance=0.6, **FAST)  # random weights: see test_quantize
    b = Bundle.open(out)
    assert b.verify() == [] and b.component("unet").precision == f"{mode}-qdq" and b.component("unet").parity.passed
    model = _onnx(out / "unet/model.onnx")
    assert qdq_rules.violations(model, mode) == []
    cond = conditioning_only(_onnx(parent / "unet/model.onnx"))
    kept = _float_weights(model, cond)
    assert len(kept) == len(cond) and sum("add_embedding/" in n.name for n in kept) == 2
    a, b_ = _images(parent, out)
    assert np.isfinite(b_).all() and 0 < np.abs(a - b_).mean() < 0.2


def test_fp16_covers_both_text_encoders_by_default(base, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    out = tmp_path / "fp16"
    r = CliRunner().invoke(main, ["quantize", str(base), str(out), "--fp16", "--calib-size", "1", "--steps", "2"])
    assert r.exit_code == 0, r.output
    b = Bundle.open(out)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        comp = b.component(name)
        assert comp.precision in ("fp16", "mixed-fp16") and comp.parity.passed, name
        assert all(s.dtype in ("float32", "int32", "int64") for s in comp.inputs)
    a, b_ = _images(base, out)
    assert np.abs(a - b_).max() < 0.02


def test_components_takes_text_encoder_2_on_a_refiner(refiner, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    out = tmp_path / "te2"
    r = CliRunner().invoke(main, ["quantize", str(refiner), str(out), "--fp16", "--components", "text_encoder_2",
                                  "--calib-size", "1", "--steps", "2"])
    assert r.exit_code == 0, r.output
    comps = Bundle.open(out).manifest.components
    assert comps["text_encoder_2"].precision in ("fp16", "mixed-fp16") and comps["unet"].precision == "fp32"
    r = CliRunner().invoke(main, ["quantize", str(refiner), str(tmp_path / "x"), "--fp16", "--components",
                                  "text_encoder"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        "error: --components: 'text_encoder' is not in this bundle; it has ['text_encoder_2', 'unet', "
        "'vae_decoder', 'vae_encoder']")


# -- build: TensorRT profiles (the builder itself needs a GPU) ----------------------------------------------
@pytest.mark.parametrize("preset, time_ids", [("tiny-sdxl", 6), ("tiny-sdxl-refiner", 5)])
def test_build_profiles_cover_the_sdxl_components_and_inputs(tmp_path_factory, preset, time_ids):
    from edgediff.engines.tensorrt.build import default_components
    from edgediff.engines.tensorrt.profiles import ShapeRange, profile_shapes, shape_range_for

    b = Bundle.open(tiny_sdxl(tmp_path_factory, preset).bundle)
    m = b.manifest
    names = default_components(b)
    assert names == (["text_encoder", "text_encoder_2", "unet", "vae_decoder"] if preset == "tiny-sdxl"
                     else ["text_encoder_2", "unet", "vae_decoder"])
    assert shape_range_for(b).height == (8, 16, 24)  # around the manifest's own size (1024 for the real SDXL)
    r = ShapeRange(images=(1, 1, 4), height=(8, 16, 24), width=(8, 16, 24))
    shapes = {n: profile_shapes(b.component(n), m, r) for n in names}
    pooled = b.component("unet").input("text_embeds").shape[1]
    assert shapes["unet"]["text_embeds"] == ((1, pooled), (2, pooled), (8, pooled))  # CFG doubles the batch
    assert shapes["unet"]["time_ids"] == ((1, time_ids), (2, time_ids), (8, time_ids))
    assert shapes["unet"]["sample"] == ((1, 4, 4, 4), (2, 4, 8, 8), (8, 4, 12, 12))
    assert shapes["text_encoder_2"]["input_ids"] == ((1, 77), (2, 77), (8, 77))
    assert shapes["vae_decoder"]["latent_sample"][2] == (4, 4, 12, 12)
    for comp in shapes.values():  # every input of every component has a profile: nothing left for TensorRT to guess
        assert all(len(set(map(len, triple))) == 1 for triple in comp.values())


def test_build_refuses_a_component_the_refiner_lacks_before_tensorrt(refiner, tmp_path):
    from edgediff.engines.tensorrt.build import BuildOptions, build_engines
    from edgediff.engines.tensorrt.profiles import static_range
    from edgediff.errors import BundleError

    with pytest.raises(BundleError, match=r"no 'text_encoder' component \(has \['text_encoder_2', 'unet'"):
        build_engines(refiner, BuildOptions(shape_range=static_range(1, 16, 16)), engine_dir=tmp_path,
                      components=["text_encoder"])
