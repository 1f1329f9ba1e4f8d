"""edgediff quantize on the tiny fixture: each precision, the Q/DQ layout TensorRT needs, parity receipts, and
one clear error for each bad request. (Random tiny weights quantize worse than trained ones: INT8/FP8 runs here
pass an explicit tolerance, and the default bound is shown to refuse them.)"""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.engines import qdq_rules
from edgediff.engines.conditioning import conditioning_only
from edgediff.engines.quantize import quantize_bundle
from edgediff.errors import EngineError, InputError, OutputExistsError, ParityError
from edgediff.pipeline import Pipeline

FAST = dict(calib_size=2, steps=3)


@pytest.fixture(scope="module")
def int8(tiny_sd1_bundle, tmp_path_factory):
    return quantize_bundle(tiny_sd1_bundle, tmp_path_factory.mktemp("q") / "int8", mode="int8", tolerance=0.6, **FAST)


def _onnx(path):
    import onnx

    return onnx.load(str(path))


def test_int8_is_explicit_qdq_in_tensorrt_layout(int8):
    b = Bundle.open(int8)
    assert b.verify() == []
    unet = b.component("unet")
    assert unet.precision == "int8-qdq" and unet.parity.metric == "rel_l2" and unet.parity.passed
    assert b.component("text_encoder").precision == "fp32"  # only the denoiser by default
    model = _onnx(int8 / "unet/model.onnx")
    assert qdq_rules.violations(model, "int8") == []
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    # conv_in and conv_out stay float; every other convolution reads a dequantized weight
    assert producers.get(convs[0].input[1]) is None and producers.get(convs[-1].input[1]) is None
    assert all(producers[c.input[1]].op_type == "DequantizeLinear" for c in convs[1:-1])
    assert "--int8" in b.manifest.provenance.transforms[0] and "--calib-size 2 --steps 3" in b.manifest.provenance.transforms[0]


def test_layers_that_see_only_the_conditioning_stay_float(int8, tiny_sd1_bundle):
    """Time-embedding and text-only layers (K, V of cross-attention) are found from the graph and left float: a
    few vectors' worth of compute, and an error there shifts the whole image (docs/engines.md)."""
    exported = _onnx(tiny_sd1_bundle / "unet/model.onnx")
    cond = conditioning_only(exported)
    for part in ("time_embedding/linear_1/", "time_embedding/linear_2/", "time_emb_proj/", "attn2/to_k/",
                 "attn2/to_v/"):
        assert any(part in n for n in cond), part
    assert not [n for n in cond if any(p in n for p in ("attn1/", "attn2/to_q", "attn2/to_out", "conv", "ff."))]
    model = _onnx(int8 / "unet/model.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    kept = [n for n in model.graph.node if n.name in cond]
    assert len(kept) == len(cond) and all(n.input[1] not in producers for n in kept)  # float initializers
    assert conditioning_only(_onnx(tiny_sd1_bundle / "text_encoder/model.onnx")) == set()


def test_int8_bundle_generates_close_to_fp32(int8, tiny_sd1_bundle):
    kw = dict(num_inference_steps=3, seed=3, output_type="np")
    with Pipeline.load(tiny_sd1_bundle) as p0, Pipeline.load(int8) as p1:
        a, b = p0("a blue square", **kw).images[0], p1("a blue square", **kw).images[0]
    assert np.isfinite(b).all() and 0 < np.abs(a - b).mean() < 0.2


def test_a_quantization_over_its_tolerance_is_refused_and_writes_nothing(tiny_sd1_bundle, tmp_path):
    # The bound is set below any INT8 error: the tiny random UNet's own INT8 error depends on the CPU's INT8 kernels
    # (over the default 0.15 on an AVX2-only CPU, under it on a VNNI one), so the default cannot be relied on here.
    with pytest.raises(ParityError, match="rel_l2 .* over the int8-qdq tolerance 1e-06; nothing was written"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "q", mode="int8", tolerance=1e-6, **FAST)
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode, precision", [("int8-weights", "int8-weights"), ("int4-weights", "int4-weights")])
def test_weight_only_modes(tiny_sd1_bundle, tmp_path, mode, precision):
    out = quantize_bundle(tiny_sd1_bundle, tmp_path / mode, mode=mode, **FAST)
    b = Bundle.open(out)
    unet = b.component("unet")
    assert unet.precision == precision and unet.parity.passed
    assert unet.size < Bundle.open(tiny_sd1_bundle).component("unet").size
    with Pipeline.load(out) as p:
        img = p("a red circle", num_inference_steps=2, seed=0, output_type="np").images[0]
    assert np.isfinite(img).all()


def test_fp16_keeps_fp32_io_and_generates(tiny_sd1_bundle, tmp_path):
    out = quantize_bundle(tiny_sd1_bundle, tmp_path / "fp16", mode="fp16", **FAST)
    b = Bundle.open(out)
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        comp = b.component(name)
        assert comp.precision in ("fp16", "mixed-fp16") and comp.parity.metric == "max_rel" and comp.parity.passed
        assert all(s.dtype in ("float32", "int32", "int64") for s in comp.inputs)
    inits = _onnx(out / "unet/model.onnx").graph.initializer
    assert sum(t.data_type == 10 for t in inits) > len(inits) // 2  # FLOAT16 weights
    with Pipeline.load(out) as p:
        img = p("a red circle", num_inference_steps=2, seed=0, output_type="np").images[0]
    assert np.isfinite(img).all()


def test_fp16_keeps_overflowing_nodes_in_fp32(tiny_sd1_bundle, tmp_path, monkeypatch):
    """Lower the overflow limit so that calibrated activations cross it: those nodes must stay fp32."""
    from edgediff.engines import quantize as q

    monkeypatch.setattr(q, "FP16_HEADROOM", q.FP16_MAX / 0.5)  # limit |x| <= 0.5: most activations exceed it
    out = quantize_bundle(tiny_sd1_bundle, tmp_path / "fp16", mode="fp16", components=["unet"], **FAST)
    assert Bundle.open(out).component("unet").precision == "mixed-fp16"
    ops = [n.op_type for n in _onnx(out / "unet/model.onnx").graph.node]
    assert ops.count("Cast") > 10  # fp32 islands are entered and left through casts


def test_fp8_is_produced_and_structurally_valid(tiny_sd1_bundle, tmp_path):
    out = quantize_bundle(tiny_sd1_bundle, tmp_path / "fp8", mode="fp8", tolerance=0.6, **FAST)
    model = _onnx(out / "unet/model.onnx")
    assert qdq_rules.violations(model, "fp8") == []
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19  # FP8 types need 19


def test_qdq_rules_catch_what_tensorrt_rejects():
    import onnx
    from onnx import TensorProto, helper

    def graph(zp_value, zp_type, scale):
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                 helper.make_tensor("z", zp_type, [], [zp_value])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert qdq_rules.violations(graph(0, TensorProto.INT8, 0.1)) == []
    assert any("not 0 (asymmetric)" in v for v in qdq_rules.violations(graph(3, TensorProto.INT8, 0.1)))
    assert any("UINT8; TensorRT needs INT8" in v for v in qdq_rules.violations(graph(0, TensorProto.UINT8, 0.1)))
    assert any("positive and finite" in v for v in qdq_rules.violations(graph(0, TensorProto.INT8, 0.0)))
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert qdq_rules.violations(empty) == ["no QuantizeLinear/DequantizeLinear nodes: the graph is not quantized"]


def test_per_channel_axis_rule():
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.INT8, [8, 4, 3, 3], [0] * 288)
    s = helper.make_tensor("s", TensorProto.FLOAT, [8], [0.1] * 8)
    z = helper.make_tensor("z", TensorProto.INT8, [8], [0] * 8)

    def conv(axis):
        nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=axis),
                 helper.make_node("Conv", ["x", "wf"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s, z])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert qdq_rules.violations(conv(0)) == []
    assert any("output-channel axis is 0" in v for v in qdq_rules.violations(conv(1)))


def test_bad_requests_one_line_each(tiny_sd1_bundle, int8, tmp_path):
    with pytest.raises(InputError, match="unknown precision 'int3'"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int3")
    with pytest.raises(InputError, match="calibration prompt file not found"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", calib_prompts=tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", calib_prompts=tmp_path / "empty.txt")
    with pytest.raises(InputError, match="--steps 0"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", steps=0)
    with pytest.raises(InputError, match="--calib-size 0"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", calib_size=0)
    with pytest.raises(EngineError, match="already int8-qdq; quantize the fp32 bundle"):
        quantize_bundle(int8, tmp_path / "x", mode="int8")
    with pytest.raises(InputError, match="'vae' is not in this bundle"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", components=["vae"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "a.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not empty"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "taken", mode="int8-weights")
    assert (tmp_path / "taken" / "a.txt").read_text() == "keep"


def test_cli_errors_are_one_red_line(tiny_sd1_bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    r = CliRunner().invoke(main, ["quantize", str(tiny_sd1_bundle), str(tmp_path / "x")])
    assert r.exit_code != 0 and r.output.strip().splitlines()[-1].startswith("error: choose a precision")
    r = CliRunner().invoke(main, ["quantize", str(tiny_sd1_bundle), str(tmp_path / "x"), "--int8", "--calib-prompts",
                                  str(tmp_path / "missing.txt")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == f"error: calibration prompt file not found: {tmp_path / 'missing.txt'}"


def test_int8_for_cpu_keeps_attention_fusable(tiny_sd1_bundle, tmp_path):
    """--target cpu leaves the attention projections float; the TensorRT layout quantizes them. optimize --target cpu
    fuses every attention of both: a Q/DQ UNet takes engines.attention_fusion, which starts after the projections
    (ONNX Runtime's own fusion found none behind Q/DQ; docs/engines.md), and runs every INT8 MatMul integer."""
    from edgediff.engines.attention import attention_projections
    from edgediff.engines.optimize import optimize_bundle

    exported = _onnx(tiny_sd1_bundle / "unet/model.onnx")
    projections = attention_projections(exported)
    blocks = sum(n.op_type == "Softmax" for n in exported.graph.node)
    assert blocks > 0 and len(projections) == 4 * blocks  # q, k, v, out per attention
    assert all(p.endswith(("to_q/MatMul", "to_k/MatMul", "to_v/MatMul", "to_out.0/MatMul")) for p in projections)

    fused = {}
    for target in ("cpu", "tensorrt"):
        q = quantize_bundle(tiny_sd1_bundle, tmp_path / f"q-{target}", mode="int8", target=target, tolerance=0.6, **FAST)
        model = _onnx(q / "unet/model.onnx")
        producers = {o: n for n in model.graph.node for o in n.output}
        weights_dq = {n.name for n in model.graph.node
                      if n.op_type == "MatMul" and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"}
        if target == "cpu":
            assert not weights_dq & projections and weights_dq  # feed-forward MatMuls are still INT8
            assert "--target cpu" in Bundle.open(q).manifest.provenance.transforms[0]
        else:  # all but those that see only the text (K, V of cross-attention: engines.conditioning)
            assert projections - conditioning_only(exported) <= weights_dq
        messages = []
        opt = optimize_bundle(q, tmp_path / f"o-{target}", target="cpu", progress=messages.append)
        ops = [n.op_type for n in _onnx(opt / "unet/model.onnx").graph.node]
        fused[target] = ops.count("Attention") + ops.count("MultiHeadAttention")
        assert "unet: Q/DQ graph; fusing attention from the graph's structure" in messages
        assert ops.count("Softmax") == 0
        # ONNX Runtime's integer kernels took every quantized MatMul: self-attention's q, k, v too, whose shared s8
        # input kept them dequantized float MatMuls before engines.qdq_uint8
        assert ops.count("QLinearMatMul") == len(weights_dq)
    assert fused == {"cpu": blocks, "tensorrt": blocks}


def test_quantize_target_errors(tiny_sd1_bundle, tmp_path):
    with pytest.raises(InputError, match="--target 'gpu'; expected one of"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="int8", target="gpu")
    with pytest.raises(InputError, match="--target cpu applies to --int8 only"):
        quantize_bundle(tiny_sd1_bundle, tmp_path / "x", mode="fp8", target="cpu")


@pytest.mark.parametrize("flags", [["--int8", "--fp16"], ["--fp16", "--int8-weights", "--fp16"]])
def test_precision_flags_are_exclusive(tiny_sd1_bundle, tmp_path, flags):
    """click keeps the last of several flags sharing one variable: `--int8 --fp16` quietly made an fp16 bundle."""
    from click.testing import CliRunner

    from edgediff.cli import main

    r = CliRunner().invoke(main, ["quantize", str(tiny_sd1_bundle), str(tmp_path / "x"), *flags])
    first, second = flags[0], flags[1]
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {first} and {second} are exclusive: a bundle has one precision; choose one"]
    assert not (tmp_path / "x").exists()


def test_calibration_steps_default_to_the_bundle_s(bundle_copy, tmp_path):
    """Calibration sees the timesteps the bundle will run at: its recommended step count, not a fixed 20."""
    import dataclasses

    from edgediff.bundle.manifest import GenerationDefaults
    from edgediff.bundle.writer import write_manifest

    m = Bundle.open(bundle_copy).manifest
    write_manifest(bundle_copy, dataclasses.replace(m, defaults=GenerationDefaults(steps=3)))
    out = quantize_bundle(bundle_copy, tmp_path / "q", mode="int8", calib_size=1, tolerance=0.6)
    assert "--calib-size 1 --steps 3" in Bundle.open(out).manifest.provenance.transforms[0]


def test_a_file_size_limit_while_writing_is_one_line(tiny_sd1_bundle, tmp_path):
    """A disk that refuses the bytes (here a file size limit, as a full disk would with ENOSPC) is one line naming
    the file and the cause, and leaves nothing behind."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():  # 8 KiB per file; without the signal ignored the kernel would kill the process instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-c", "from edgediff.cli import main; main()", "quantize",
                        str(tiny_sd1_bundle), str(out), "--int8-storage"], preexec_fn=limit, capture_output=True,
                       text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f"error: cannot write {out}: ") and "Traceback" not in r.stderr
    assert "File too large; the file system or a file size limit (ulimit -f) refuses a file this large" in last
    assert list(tmp_path.iterdir()) == []


def test_int8_of_a_graph_with_external_data(tiny_sd1_bundle, tmp_path):
    """Graphs over 2 GB keep their weights in model.onnx_data: calibrated beside a link to it (engines.calibrate),
    quantized in a child process, and the result lands with the bundle's file name and passes TensorRT's rules."""
    from external_data import external_copy

    src = external_copy(tiny_sd1_bundle, tmp_path / "ext")
    messages = []
    out = quantize_bundle(src, tmp_path / "q", mode="int8", tolerance=0.6, progress=messages.append, **FAST)
    assert sorted(p.name for p in (out / "unet").iterdir() if "onnx" in p.name) == ["model.onnx", "model.onnx_data"]
    assert Bundle.open(out).component("unet").precision == "int8-qdq"
    assert qdq_rules.violations(_onnx(out / "unet/model.onnx"), "int8") == []
    assert any(m.startswith("unet: calibrating on ") for m in messages)
    with Pipeline.load(tiny_sd1_bundle) as p0, Pipeline.load(out) as p1:
        a, b = (p("a red circle", num_inference_steps=3, seed=0, output_type="np").images[0] for p in (p0, p1))
    assert np.isfinite(b).all() and np.abs(a - b).max() < 0.5


def test_deepcache_graphs_follow_the_unet_s_precision(tiny_sd1_deepcache_bundle, tmp_path):
    """DeepCache's full and shallow UNets run in the unet's place on a cached request: quantizing the unet quantizes
    them too by default (calibrated on a DeepCache run's inputs), and the cached image stays close to fp32's;
    naming only the unet leaves them as they were."""
    out = quantize_bundle(tiny_sd1_deepcache_bundle, tmp_path / "int8", mode="int8", tolerance=0.6, **FAST)
    b = Bundle.open(out)
    assert b.verify() == []
    cached = ("unet_deepcache_full", "unet_deepcache_shallow_0", "unet_deepcache_shallow_1")
    for name in ("unet", *cached):
        comp = b.component(name)
        assert comp.precision == "int8-qdq" and comp.parity.passed, name
        assert qdq_rules.violations(_onnx(out / name / "model.onnx"), "int8") == [], name
    assert b.manifest.provenance.transforms[-1].startswith(f"quantize --int8 --components unet,{','.join(cached)} ")
    kw = dict(num_inference_steps=4, seed=3, output_type="np", cache_interval=2, cache_branch=1)
    with Pipeline.load(tiny_sd1_deepcache_bundle) as p0, Pipeline.load(out) as p1:
        a, q = p0("a blue square", **kw).images[0], p1("a blue square", **kw).images[0]
    assert np.isfinite(q).all() and 0 < np.abs(a - q).mean() < 0.2

    only = quantize_bundle(tiny_sd1_deepcache_bundle, tmp_path / "w8", mode="int8-weights", components=["unet"])
    assert [Bundle.open(only).component(n).precision for n in ("unet", *cached)] == ["int8-weights"] + ["fp32"] * 3
