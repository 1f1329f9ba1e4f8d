"""edgediff optimize on the tiny fixture: fusions stored ahead of time, static shapes, TensorRT clean-up; the
derived bundles verify, carry parity receipts and generate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.engines.optimize import optimize_bundle, parse_static
from edgediff.errors import BackendUnavailable, EngineError, InputError, OutputExistsError
from edgediff.pipeline import Pipeline


@pytest.fixture(scope="module")
def cpu_opt(tiny_sd1_bundle, tmp_path_factory):
    return optimize_bundle(tiny_sd1_bundle, tmp_path_factory.mktemp("opt") / "cpu", target="cpu")


def test_cpu_target_fuses_and_marks_the_graphs(cpu_opt, tiny_sd1_bundle):
    import onnx

    b = Bundle.open(cpu_opt)
    assert b.verify() == []
    for name, comp in b.manifest.components.items():
        assert comp.optimized_for == "cpu" and comp.precision == "fp32"
        assert comp.parity is not None and comp.parity.passed and comp.parity.reference.startswith("parent bundle")
        assert comp.parity.max_rel <= 1e-3
    assert b.manifest.provenance.transforms == ("optimize --target cpu",)
    assert b.manifest.provenance.parent == Bundle.open(tiny_sd1_bundle).digest
    before = len(onnx.load(str(tiny_sd1_bundle / "unet/model.onnx")).graph.node)
    after = len(onnx.load(str(cpu_opt / "unet/model.onnx")).graph.node)
    assert after < before / 2  # shape arithmetic folded, attention/norm/GELU patterns fused


def test_optimized_bundle_generates_the_same_image(cpu_opt, tiny_sd1_bundle):
    kw = dict(num_inference_steps=3, seed=5, output_type="np")
    with Pipeline.load(tiny_sd1_bundle) as p0, Pipeline.load(cpu_opt) as p1:
        a, b = p0("a red circle", **kw).images[0], p1("a red circle", **kw).images[0]
    assert np.abs(a - b).max() < 1e-3


def test_cpu_optimized_graph_is_refused_by_other_providers(cpu_opt):
    from edgediff.backends.ort import OrtBackend

    b = Bundle.open(cpu_opt)
    with pytest.raises(BackendUnavailable, match="optimized for ONNX Runtime's 'cpu'"):
        OrtBackend(b.model_path("unet"), b.component("unet"), "cuda")


def test_static_shapes_are_fixed_in_graph_and_manifest(tiny_sd1_bundle, tmp_path):
    out = optimize_bundle(tiny_sd1_bundle, tmp_path / "static", target="cpu", static=parse_static("1x32x32"))
    m = Bundle.open(out).manifest
    f = m.vae_scale_factor
    assert m.components["unet"].input("sample").shape == (2, 4, 32 // f, 32 // f)  # CFG: 2 x 1 image
    assert m.components["vae_decoder"].input("latent_sample").shape == (1, 4, 32 // f, 32 // f)
    assert m.components["text_encoder"].input("input_ids").shape[0] == "batch"  # stays dynamic
    assert m.provenance.transforms == ("optimize --target cpu --static 1x32x32",)
    with Pipeline.load(out) as p:
        img = p("a red circle", num_inference_steps=2, height=32, width=32, seed=0, output_type="np").images[0]
    assert img.shape == (32, 32, 3)


def test_tensorrt_target_keeps_standard_ops(tiny_sd1_bundle, tmp_path):
    import onnx

    out = optimize_bundle(tiny_sd1_bundle, tmp_path / "trt", target="tensorrt")
    comp = Bundle.open(out).component("unet")
    assert comp.optimized_for == "" and comp.parity.passed
    domains = {n.domain for n in onnx.load(str(out / "unet/model.onnx")).graph.node}
    assert domains <= {"", "ai.onnx"}  # nothing but standard ONNX: TensorRT's parser must read every node


@pytest.mark.parametrize("text, message", [
    ("1x512", "IMAGESxHEIGHTxWIDTH"), ("0x64x64", "images must be >= 1"), ("axbxc", "IMAGESxHEIGHTxWIDTH"),
])
def test_bad_static_spec(text, message):
    with pytest.raises(InputError, match=message):
        parse_static(text)


def test_bad_requests_fail_before_any_work(tiny_sd1_bundle, cpu_opt, tmp_path):
    with pytest.raises(InputError, match="expected one of"):
        optimize_bundle(tiny_sd1_bundle, tmp_path / "x", target="gpu")
    with pytest.raises(InputError, match="multiples of"):
        optimize_bundle(tiny_sd1_bundle, tmp_path / "x", static=parse_static("1x30x32"))
    with pytest.raises(EngineError, match="already optimized"):
        optimize_bundle(cpu_opt, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        optimize_bundle(tiny_sd1_bundle, tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_cuda_target_needs_the_cuda_provider(tiny_sd1_bundle, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    with pytest.raises(BackendUnavailable, match="CUDA provider"):
        optimize_bundle(tiny_sd1_bundle, tmp_path / "x", target="cuda")


def test_tampered_parent_is_refused(bundle_copy, tmp_path):
    from edgediff.errors import BundleIntegrityError

    p = bundle_copy / "unet" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="unet/model.onnx: altered"):
        optimize_bundle(bundle_copy, tmp_path / "x")


def test_manifest_round_trips_the_new_fields(cpu_opt):
    from edgediff.bundle.manifest import Manifest

    text = (cpu_opt / "edgediff.json").read_text()
    m = Manifest.from_json(text)
    assert Manifest.from_json(m.to_json()) == m
    assert json.loads(text)["components"]["unet"]["optimized_for"] == "cpu"


def test_static_bundle_names_its_only_size_and_batch(tiny_sd1_bundle, tmp_path):
    out = optimize_bundle(tiny_sd1_bundle, tmp_path / "static", static=parse_static("1x32x32"))
    with Pipeline.load(out) as p:
        assert p("a red circle", num_inference_steps=1, seed=0, output_type="np").images[0].shape == (32, 32, 3)
        with pytest.raises(InputError, match="fixed to 32x32 .* use --size 32x32"):
            p("a red circle", num_inference_steps=1, height=16, width=16)
        with pytest.raises(InputError, match="fixed to batch 2 .* 2 image\\(s\\) with guidance need batch 4"):
            p(["a", "b"], num_inference_steps=1)
        with pytest.raises(InputError, match="1 image\\(s\\) without guidance need batch 1"):
            p("a", num_inference_steps=1, guidance_scale=1.0)


def test_derived_bundle_keeps_the_recommended_defaults(bundle_copy, tmp_path):
    import dataclasses

    from edgediff.bundle.manifest import GenerationDefaults
    from edgediff.bundle.writer import write_manifest

    m = Bundle.open(bundle_copy).manifest
    write_manifest(bundle_copy, dataclasses.replace(m, defaults=GenerationDefaults(steps=4, guidance_scale=0.0)))
    out = optimize_bundle(bundle_copy, tmp_path / "opt", target="tensorrt")
    assert Bundle.open(out).manifest.defaults == GenerationDefaults(steps=4, guidance_scale=0.0)


@pytest.mark.parametrize("command", [["optimize"], ["quantize", "--int8-weights"]])
def test_an_unwritable_output_is_one_line_before_any_work(tiny_sd1_bundle, command):
    from click.testing import CliRunner

    from edgediff.cli import main

    if not Path("/sys").is_dir():
        pytest.skip("needs /sys, which refuses new entries even to root")
    r = CliRunner().invoke(main, [command[0], str(tiny_sd1_bundle), "/sys/edgediff-test/out", *command[1:]])
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: cannot write /sys/edgediff-test/out: /sys: ") and "choose a writable" in last
    assert "capturing" not in r.output and "parity" not in r.output  # refused before the work


def test_a_full_disk_while_writing_is_one_line(tiny_sd1_bundle, tmp_path, monkeypatch):
    import errno
    import os

    from edgediff.engines import derive
    from edgediff.errors import OutputWriteError

    def full(graph, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    # optimize's graphs come as files moved into place (quantize's are saved from memory: derive.save_model)
    monkeypatch.setattr(derive, "_move_graph", full)
    with pytest.raises(OutputWriteError, match=r"cannot write .*/out: .*/text_encoder/model.onnx: No space left on "
                                               r"device; free some space .*; nothing was written to .*/out$"):
        optimize_bundle(tiny_sd1_bundle, tmp_path / "out", target="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_derived_bundle_honours_the_umask(cpu_opt):
    """mkdtemp made the bundle folder 0700 and copies kept the parent's modes, whatever the umask."""
    import os

    from edgediff.bundle.writer import current_umask

    mask = current_umask()
    assert oct(cpu_opt.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    for root, dirs, files in os.walk(cpu_opt):
        for d in dirs:
            assert oct(os.stat(os.path.join(root, d)).st_mode & 0o777) == oct(0o777 & ~mask)
        for f in files:
            assert oct(os.stat(os.path.join(root, f)).st_mode & 0o777) == oct(0o666 & ~mask), f


def test_a_unet_too_big_for_the_optimizer_gets_attention_fused_without_its_weights(tiny_sd1_bundle, tmp_path,
                                                                                  monkeypatch):
    """The lean path (engines.attention_fusion), taken when ~4x the weights would not fit in memory: every attention
    becomes MultiHeadAttention without the weights being loaded, the text encoders and VAE take the full path, and
    the bundle passes parity and generates the image the exported bundle does."""
    import onnx

    from edgediff.engines import optimize

    asked = []
    monkeypatch.setattr(optimize, "_too_big_to_fuse", lambda graph: asked.append(Path(graph).parent.name) or True)
    messages = []
    out = optimize_bundle(tiny_sd1_bundle, tmp_path / "lean", target="cpu", progress=messages.append)
    assert asked == ["unet"]  # only the components the lean fusion knows are asked about
    assert any("unet:" in m and "structure alone" in m for m in messages)
    b = Bundle.open(out)
    assert b.verify() == [] and b.manifest.components["unet"].parity.passed
    softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(tiny_sd1_bundle / "unet/model.onnx")).graph.node)
    ops = [n.op_type for n in onnx.load(str(out / "unet/model.onnx")).graph.node]
    assert ops.count("MultiHeadAttention") == softmaxes and "Softmax" not in ops
    kw = dict(num_inference_steps=2, seed=5, output_type="np")
    with Pipeline.load(tiny_sd1_bundle) as p0, Pipeline.load(out) as p1:
        np.testing.assert_allclose(p1("a red cube", **kw).images, p0("a red cube", **kw).images, atol=2 / 255)


def test_compare_of_a_derived_bundle_runs_the_pipeline_it_was_exported_from(cpu_opt, tiny_sd1_bundle,
                                                                            tiny_sd1_source):
    """bench --compare diffusers on an optimized bundle: its recorded source is the parent bundle, whose
    model_index.json names diffusers classes without their weights (the worker failed after ours was measured)."""
    from edgediff.bench.sweep import _reference

    assert Bundle.open(cpu_opt).manifest.provenance.source == str(tiny_sd1_bundle)
    assert _reference(Bundle.open(cpu_opt), None) == Path(tiny_sd1_source)
    assert _reference(Bundle.open(cpu_opt), Path("/given")) == Path("/given")


def test_saved_vae_graphs_are_reoptimized_at_load_and_the_others_open_as_saved(cpu_opt):
    """The VAE's level-"all" pass (NCHWc convolutions for this CPU) costs well under a second at load and runs ~0.8x;
    the UNet and text encoders open with optimizations off (cold start) unless asked, and explicit values win."""
    import onnxruntime as ort

    from edgediff.backends.ort import OrtBackend, OrtOptions

    b = Bundle.open(cpu_opt)

    def level(name, **kw):
        backend = OrtBackend(b.model_path(name), b.component(name), "cpu", OrtOptions(**kw))
        return backend.session.get_session_options().graph_optimization_level

    ALL, OFF = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert [level(n) for n in ("vae_decoder", "vae_encoder", "unet", "text_encoder")] == [ALL, ALL, OFF, OFF]
    assert level("unet", reoptimize_saved_graphs=True) == ALL
    assert level("vae_decoder", reoptimize_saved_graphs=False) == OFF
    from edgediff.bundle.summary import summary_lines

    text = "\n".join(summary_lines(b))
    assert "re-optimized at load" in text and "opened with graph optimizations off" in text


def test_deepcache_graphs_are_fused_checked_on_real_inputs_and_draw_the_same_image(tiny_sd1_deepcache_bundle, tmp_path):
    """DeepCache's full and shallow graphs are UNets: optimize fuses their attention as it fuses the unet's (a cached
    step would otherwise run the unfused attention the plain step no longer does) and checks each on inputs captured
    from a DeepCache run (the plain capture never calls them)."""
    import onnx

    messages = []
    out = optimize_bundle(tiny_sd1_deepcache_bundle, tmp_path / "opt", target="cpu", progress=messages.append)
    b = Bundle.open(out)
    assert b.verify() == []
    cached = ["unet_deepcache_full", "unet_deepcache_shallow_0", "unet_deepcache_shallow_1"]
    for name in cached:
        comp = b.manifest.components[name]
        assert comp.optimized_for == "cpu" and comp.parity.passed and comp.parity.max_rel <= 1e-3
        assert any(m.startswith(f"{name}: parity on ") for m in messages)
        before = [n.op_type for n in onnx.load(str(tiny_sd1_deepcache_bundle / name / "model.onnx")).graph.node]
        after = [n.op_type for n in onnx.load(str(out / name / "model.onnx")).graph.node]
        fused = after.count("MultiHeadAttention") + after.count("Attention")
        assert before.count("Softmax") > 0 and fused == before.count("Softmax") and "Softmax" not in after, name
    kw = dict(num_inference_steps=5, seed=5, output_type="np", cache_interval=2)
    with Pipeline.load(tiny_sd1_deepcache_bundle) as p0, Pipeline.load(out) as p1:
        for branch in (0, 1):
            a = p0("a red circle", cache_branch=branch, **kw).images
            np.testing.assert_allclose(p1("a red circle", cache_branch=branch, **kw).images, a, atol=1e-3)


def test_static_fixes_the_deepcache_graphs_and_their_cached_feature(tiny_sd1_deepcache_bundle, tmp_path):
    """--static fixes the shallow graphs' cached feature too: batch 2N with guidance, the latent size halved once per
    down block above the branch (branches 0 and 1 are in block 0: the latent size itself)."""
    out = optimize_bundle(tiny_sd1_deepcache_bundle, tmp_path / "s", target="cpu", static=parse_static("1x32x32"))
    b = Bundle.open(out)
    f = b.manifest.vae_scale_factor
    for name in ("unet_deepcache_full", "unet_deepcache_shallow_0", "unet_deepcache_shallow_1"):
        assert b.component(name).input("sample").shape == (2, 4, 32 // f, 32 // f), name
        assert b.component(name).parity.passed
    for name in ("unet_deepcache_shallow_0", "unet_deepcache_shallow_1"):
        assert b.component(name).input("deep_feature").shape[0] == 2
        assert b.component(name).input("deep_feature").shape[2:] == (32 // f, 32 // f)
    kw = dict(num_inference_steps=4, seed=2, output_type="np", cache_interval=2, cache_branch=1, height=32, width=32)
    with Pipeline.load(tiny_sd1_deepcache_bundle) as p0, Pipeline.load(out) as p1:
        np.testing.assert_allclose(p1("a red circle", **kw).images, p0("a red circle", **kw).images, atol=1e-3)


def test_static_parity_prompt_fits_the_text_window():
    """The exported parent splits a prompt longer than the text encoder's window into chunks, which a static UNet
    (its text axis fixed at the window) refuses: the built-in model's 24 tokens are shorter than the parity prompt,
    and optimize --static failed there on its own parity inputs."""
    from edgediff.builtin_model import default_bundle
    from edgediff.engines.optimize import PARITY_PROMPTS, _in_window
    from edgediff.tokenizer import ClipTokenizer

    b = Bundle.open(default_bundle())
    tok = ClipTokenizer.from_files(b.tokenizer_files(), max_length=b.manifest.text_max_length)
    room = b.manifest.text_max_length - 2
    assert len(tok.token_ids([PARITY_PROMPTS[0]])[0]) > room  # the case this guards
    (cut,) = _in_window(b, PARITY_PROMPTS[:1])
    assert PARITY_PROMPTS[0].startswith(cut) and 0 < len(tok.token_ids([cut])[0]) <= room
