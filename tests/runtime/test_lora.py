"""LoRA hot-swap on ONNX Runtime (runtime/lora/, Pipeline.load(loras=) / set_loras, generate --lora), checked
against diffusers.

Reference: diffusers StableDiffusionPipeline (installed version) with ``load_lora_weights`` + ``set_adapters`` +
``fuse_lora``, same latents and noise (tests/streams.py). Tolerance: images within 1e-3 (pixels in [0, 1]), as the
plain pipeline's parity tests. The LoRAs are random, made with peft on the tiny SD1 fixture (tests/lora_fixtures.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.errors import BundleError, InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from external_data import external_copy  # noqa: E402
from lora_fixtures import PROMPT, TOL, compare, ours, reference  # noqa: E402


@pytest.fixture(scope="module")
def loras(tiny_sd1_source, tmp_path_factory):
    from lora_fixtures import example_loras

    return example_loras(tiny_sd1_source, tmp_path_factory.mktemp("loras"))


def tree_digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_images(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        return ours(pipe)


# -- parity -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["a", "a_kohya"])
def test_hot_swapped_lora_matches_diffusers_fuse_lora(tiny_sd1_source, tiny_sd1_bundle, loras, base_images, fmt):
    with Pipeline.load(tiny_sd1_bundle, loras={loras[fmt]: 0.8}) as pipe:
        mine = ours(pipe)
    theirs = reference(tiny_sd1_source, [(loras[fmt], 0.8)])
    compare(mine, theirs)
    assert np.abs(theirs - base_images).max() > 50 * TOL  # the LoRA changes the images: the comparison means something


def test_two_loras_with_weights_match_diffusers_set_adapters(tiny_sd1_source, tiny_sd1_bundle, loras):
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.7, loras["b"]: 1.3}) as pipe:
        mine = ours(pipe)
    theirs = reference(tiny_sd1_source, [(loras["a"], 0.7), (loras["b"], 1.3)])
    compare(mine, theirs)
    assert np.abs(theirs - reference(tiny_sd1_source, [(loras["a"], 0.7)])).max() > 50 * TOL


def test_swap_a_b_a_is_bit_identical_and_empty_is_the_base(tiny_sd1_bundle, loras, base_images):
    before = tree_digest(tiny_sd1_bundle)
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        a = ours(pipe)
        pipe.set_loras({loras["b"]: 1.0})
        b = ours(pipe)
        assert pipe.loras == {str(loras["b"]): 1.0}
        pipe.set_loras({loras["a"]: 0.8})
        assert np.array_equal(ours(pipe), a)  # recomputed from the base, never from B's weights
        pipe.set_loras({})
        assert np.array_equal(ours(pipe), base_images) and pipe.loras == {}
    assert np.abs(a - b).max() > 50 * TOL
    assert tree_digest(tiny_sd1_bundle) == before  # nothing of the bundle changed or was added


def test_a_swap_reopens_only_the_components_it_changes(tiny_sd1_bundle, loras):
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        opened = dict(pipe.components._open)
        pipe.set_loras({loras["a"]: 0.8})  # the same LoRA: nothing recomputed, nothing reopened
        assert all(pipe.components._open[n] is b for n, b in opened.items())
        pipe.set_loras({loras["b"]: 0.8})  # UNet-only: the text encoder goes back to base, the VAE stays
        assert pipe.components._open["vae_decoder"] is opened["vae_decoder"]
        assert pipe.components._open["unet"] is not opened["unet"]
        assert pipe.components._open["text_encoder"] is not opened["text_encoder"]


def test_low_memory_mode_gives_the_same_images(tiny_sd1_bundle, loras):
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        resident = ours(pipe)
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}, low_memory=True) as pipe:
        # without pre-packed weights (low-memory mode) MLAS sums in another order: ~1e-6 apart
        np.testing.assert_allclose(ours(pipe), resident, atol=1e-5, rtol=0)


def test_fused_weights_are_not_kept_once_the_session_has_them(tiny_sd1_bundle, loras):
    """ONNX Runtime copies the changed initializers into its session: keeping ours too was a second copy of every
    changed weight (3.1 GiB for a LoRA on every layer of SD 1.5's UNet). Low-memory mode reopens per stage and keeps
    them; a reopen after release recomputes the same bits."""
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        kept = pipe.components._weights["unet"]
        assert len(kept) > 0 and kept._arrays is None
        first = ours(pipe)
        again = dict(kept)  # recomputed on demand from the base weights
        pipe.components.set_weights({})
        pipe.components.set_weights({**pipe._loras.weights})
        assert np.array_equal(ours(pipe), first) and all(np.array_equal(again[k], v) for k, v in dict(kept).items())
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}, low_memory=True) as pipe:
        ours(pipe)
        assert pipe.components._weights["unet"]._arrays is not None


def test_external_data_graphs_take_the_same_weights(tiny_sd1_bundle, loras, tmp_path):
    """Graphs over 2 GB keep their weights in model.onnx_data: their initializers are replaced before ONNX
    Runtime's optimizations (add_external_initializers), exactly as the embedded path's."""
    ext = external_copy(tiny_sd1_bundle, tmp_path / "ext")
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        embedded = ours(pipe)
    before = tree_digest(ext)
    with Pipeline.load(ext, loras={loras["a"]: 0.8}) as pipe:
        compare(ours(pipe), embedded)
        assert np.abs(ours(pipe) - embedded).max() <= 1e-5
    assert tree_digest(ext) == before


def test_external_weights_are_read_as_private_copies_without_a_map(tiny_sd1_bundle, tmp_path):
    from edgediff.errors import BundleError
    from edgediff.lora.onnx_weights import GraphWeights

    ext = external_copy(tiny_sd1_bundle, tmp_path / "ext")
    g = GraphWeights(ext / "unet" / "model.onnx")
    name = max(g.names(), key=lambda n: np.prod(g.info(n).shape) if g.info_or_none(n) else 0)
    copy = g.read_copy(name)
    assert not g._maps and copy.flags.writeable and copy.flags.c_contiguous
    assert np.array_equal(copy, g.read(name)) and g._maps  # the view path maps; the copy path did not
    data = ext / "unet" / "model.onnx_data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    last = max(g.names(), key=lambda n: _offset(g, n))
    with pytest.raises(BundleError, match="lies past the end of its external data"):
        GraphWeights(ext / "unet" / "model.onnx").read_copy(last)


def _offset(g, name):
    t = g._tensors[name]
    return int({e.key: e.value for e in t.external_data}.get("offset", -1) or 0) if t.external_data else -1


def test_fp16_bundles_take_the_lora_in_their_own_dtype(tiny_sd1_source, tiny_sd1_bundle, loras, tmp_path):
    """quantize --fp16 keeps the initializers' names (the weights map carries over): the fused weights are cast to
    each initializer's dtype; images within 2/255 of diffusers' fp32 fuse."""
    from edgediff.bundle.reader import Bundle
    from edgediff.engines.quantize import quantize_bundle

    fp16 = quantize_bundle(tiny_sd1_bundle, tmp_path / "fp16", mode="fp16", calib_size=1, steps=2)
    assert Bundle.open(fp16).manifest.components["unet"].precision == "fp16"
    with Pipeline.load(fp16, loras={loras["a"]: 0.8}) as pipe:
        mine = ours(pipe)
    theirs = reference(tiny_sd1_source, [(loras["a"], 0.8)])
    assert np.abs(mine - theirs).max() <= 2 / 255


# -- bad input: one line each, the pipeline keeps what it had ---------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from lora_fixtures import bad_files as make

    return make(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["unmatched", "shape", "rank", "sdxl", "loha", "sgm", "missing"])
def test_bad_loras_are_one_line_and_change_nothing(tiny_sd1_bundle, loras, bad_files, case):
    path, match = bad_files[case]
    with pytest.raises(InputError, match=match) as info:
        Pipeline.load(tiny_sd1_bundle, loras={path: 1.0})
    assert "\n" not in str(info.value)
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8}) as pipe:
        a = ours(pipe)
        with pytest.raises(InputError, match=match):
            pipe.set_loras({loras["b"]: 1.0, path: 1.0})
        assert pipe.loras == {str(loras["a"]): 0.8} and np.array_equal(ours(pipe), a)


@pytest.mark.parametrize("value,match", [
    ({"x.safetensors": float("nan")}, "finite number"),
    ({"x.safetensors": "strong"}, "finite number"),
    ({"x.safetensors": True}, "finite number"),
    (["x.safetensors"], "map LoRA files to weights"),
    (3, "map LoRA files to weights"),
])
def test_bad_lora_arguments_are_one_line(tiny_sd1_bundle, value, match):
    with pytest.raises(InputError, match=match):
        Pipeline.load(tiny_sd1_bundle, loras=value)


def _edited(bundle, dst, *, precision=None, optimized_for=None, drop_map=False):
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    shutil.copytree(bundle, dst)
    m = Bundle.open(bundle).manifest
    unet = m.components["unet"]
    if precision:
        unet = dataclasses.replace(unet, precision=precision)
    if optimized_for:
        unet = dataclasses.replace(unet, optimized_for=optimized_for)
    files = m.files
    if drop_map:
        (dst / "unet" / "weights_map.json").unlink()
        files = tuple(f for f in files if f.path != "unet/weights_map.json")
    write_manifest(dst, dataclasses.replace(m, components=dict(m.components, unet=unet), files=files))
    return dst


@pytest.mark.parametrize("edit,match", [
    (dict(precision="int8-qdq"), "unet is int8-qdq: .*fuse at export .*and re-quantize"),
    (dict(precision="int8-storage"), "unet is int8-storage: .*fuse at export"),
    (dict(precision="fp8-qdq"), "unet is fp8-qdq"),
    (dict(drop_map=True), "has no weights_map.json.*re-export the bundle with this edgediff"),
])
def test_bundles_that_cannot_take_a_lora_at_run_time_say_why(tiny_sd1_bundle, loras, tmp_path, edit, match):
    bundle = _edited(tiny_sd1_bundle, tmp_path / "b", **edit)
    with pytest.raises(BundleError, match=match) as info:
        Pipeline.load(bundle, loras={loras["b"]: 1.0})
    assert "\n" not in str(info.value)
    Pipeline.load(bundle).close()  # the bundle itself is fine without LoRAs


def _with_map(bundle, dst, edit):
    """A copy of ``bundle`` whose unet weights map was changed by ``edit(dict)`` and re-pinned."""
    from edgediff.bundle.describe import file_entry
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    shutil.copytree(bundle, dst)
    path = dst / "unet" / "weights_map.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    m = Bundle.open(bundle).manifest
    pinned = file_entry(dst, "unet/weights_map.json")
    write_manifest(dst, dataclasses.replace(m, files=tuple(pinned if f.path == pinned.path else f for f in m.files)))
    return dst


TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
TO_K = TO_Q.replace("to_q", "to_k")


def _share(m):
    m["weights"][TO_K] = dict(m["weights"][TO_Q])


def _elsewhere(m):
    m["weights"][TO_Q]["initializer"] = "onnx::MatMul_999999"


def _unmapped(m):
    m["unmapped"].append(m["weights"].pop(TO_Q) and TO_Q)


@pytest.mark.parametrize("edit,match", [
    (_share, "share one weight in the exported graph .*fuse it at export"),
    (_elsewhere, "is missing in the graph, its weights map says .*re-export the bundle"),
    (_unmapped, "the exporter folded unet.*to_q.weight into another tensor.*fuse this LoRA at export"),
])
def test_weights_the_graph_cannot_take_alone_are_refused(tiny_sd1_bundle, loras, tmp_path, edit, match):
    bundle = _with_map(tiny_sd1_bundle, tmp_path / "b", edit)
    with pytest.raises((BundleError, InputError), match=match) as info:
        Pipeline.load(bundle, loras={loras["b"]: 1.0})
    assert "\n" not in str(info.value)


def test_a_layer_missing_from_the_map_is_named(tiny_sd1_bundle, loras, tmp_path):
    def folded(m):
        m["weights"].pop(TO_Q)

    bundle = _with_map(tiny_sd1_bundle, tmp_path / "b", folded)
    with pytest.raises(InputError, match=r"1 of its \d+ layers match no layer .*attn1\.to_q"):
        Pipeline.load(bundle, loras={loras["b"]: 1.0})


def test_ort_tensorrt_provider_refuses_changed_weights(tiny_sd1_bundle):
    """ORT's TensorRT provider caches engines by graph, not weights: changed weights are refused, not ignored."""
    import onnxruntime as ort

    from edgediff.backends.ort import _open_session
    from edgediff.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="--backend trt .*--refit"):
        _open_session(ort, tiny_sd1_bundle / "unet" / "model.onnx", ort.SessionOptions(), ["CPUExecutionProvider"],
                      "unet", "tensorrt", {"x": np.zeros(1, np.float32)})


# -- CLI --------------------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_generate_with_loras_records_them(tiny_sd1_bundle, loras, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    r = cli("generate", PROMPT, "-m", tiny_sd1_bundle, "-o", out, "--steps", "3", "--seed", "5",
            "--lora", f"{loras['a']}:0.8", "--lora", loras["b"])
    assert r.exit_code == 0, r.output
    params = json.loads(Image.open(out).text["parameters"])
    assert params["loras"] == {str(loras["a"]): 0.8, str(loras["b"]): 1.0}
    with Pipeline.load(tiny_sd1_bundle, loras={loras["a"]: 0.8, loras["b"]: 1.0}) as pipe:
        again = pipe(PROMPT, num_inference_steps=3, seed=5).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(again))


@pytest.mark.parametrize("case", ["unmatched", "sdxl", "loha", "missing"])
def test_cli_bad_lora_is_one_red_line(tiny_sd1_bundle, bad_files, tmp_path, case):
    path, match = bad_files[case]
    r = cli("generate", PROMPT, "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--steps", "2", "--lora", f"{path}:1")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in r.output, r.output
    assert not (tmp_path / "o.png").exists()


def test_cli_bad_lora_weight_is_one_line(tiny_sd1_bundle, loras, tmp_path):
    r = cli("generate", PROMPT, "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--lora", f"{loras['a']}:inf")
    assert r.exit_code == 2 and "finite number" in r.output, r.output
