"""diffusers FluxPipeline -> ONNX bundle (export/components_flux.py): the FLUX rows (CLIP pooled output, T5 states,
the transformer with 2x2 packing and position ids inside its graph), parity receipts, family and variant detection,
max_sequence_length in the manifest, one PyTorch model in memory at a time, the FLUX source checks and the random
pipelines' presets. Reference: diffusers 0.42 / transformers 5 on tiny random pipelines (tests/sdxl_fixtures.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgediff.bundle.manifest import Manifest
from edgediff.bundle.reader import Bundle
from edgediff.errors import ExportError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdxl_fixtures import OrtBackend  # noqa: E402


def _names(specs):
    return [s.name for s in specs]


def _run_graph(bundle_dir, name: str, feeds: dict) -> np.ndarray:
    """The component's first output from an ONNX Runtime CPU session."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    path = str(Bundle.open(bundle_dir).model_path(name))
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_bundle_has_the_flux_io_and_passing_receipts(request, variant):
    built = request.getfixturevalue(f"tiny_flux_{variant}")
    b = Bundle.open(built.bundle)
    m = b.manifest
    assert m.family == "flux" and m.prediction_type == "flow" and m.text_max_length == 77
    assert m.max_sequence_length == 512 and m.defaults.steps == (28 if variant == "dev" else 4)
    # dev: FluxPipeline's default; schnell: its model card's 0.0 (no guidance input to apply a value to)
    assert b.default_guidance == (3.5 if variant == "dev" else 0.0)
    assert m.shift_factor == pytest.approx(0.1159) and m.scaling_factor == pytest.approx(0.3611)
    assert set(m.components) == {"text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"}
    # VAE factor 2 x the 2x2 packing (patch_size 1, in_channels 16 = 4 x 4 latent channels)
    assert b.denoiser == "transformer" and b.size_multiple == 4 and (m.default_height, m.default_width) == (256, 256)
    for comp in m.components.values():
        assert comp.parity is not None and comp.parity.passed and comp.parity.max_rel < 1e-4, (comp.name, comp.parity)
    te, te2, tr = (m.components[n] for n in ("text_encoder", "text_encoder_2", "transformer"))
    assert _names(te.outputs) == ["pooler_output"] and te.output("pooler_output").shape == ("batch", 32)
    assert _names(te2.outputs) == ["last_hidden_state"]
    assert te2.output("last_hidden_state").shape == ("batch", "sequence", 24)
    extra = ["guidance"] if variant == "dev" else []
    assert _names(tr.inputs) == ["sample", "timestep", "encoder_hidden_states", "pooled_projections", *extra]
    assert tr.input("sample").shape == ("batch", 4, "height", "width")  # unpacked latents in, unpacked out
    assert tr.output("out_sample").shape == ("batch", 4, "height", "width")
    # checked at another batch, a non-square size and another text length than it was traced with
    assert tr.parity.inputs["sample"] == [1, 4, 16, 12] and tr.parity.inputs["encoder_hidden_states"] == [1, 24, 24]
    assert b.verify() == [] and Manifest.from_json(m.to_json()) == m
    pinned = {f.path for f in m.files}
    assert {"tokenizer_2/tokenizer.json", "tokenizer/vocab.json", "transformer/config.json"} <= pinned
    assert b.config("transformer/config.json")["guidance_embeds"] is (variant == "dev")


def test_exporter_holds_one_pytorch_model_at_a_time(tiny_flux_dev):
    assert tiny_flux_dev.trace.events == [
        ("load", "text_encoder", ()), ("check", "text_encoder", ()),
        ("load", "text_encoder_2", ()), ("check", "text_encoder_2", ()),
        ("load", "transformer", ()), ("check", "transformer", ()),
        ("load", "vae", ()), ("check", "vae_decoder", ("vae",)), ("check", "vae_encoder", ()),
    ]


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_transformer_graph_is_diffusers_model_on_packed_latents(request, variant):
    """The graph on (B, C, h, w) latents equals FluxTransformer2DModel called as FluxPipeline calls it: latents
    packed with _pack_latents, _prepare_latent_image_ids, zero text ids, timestep / 1000, guidance as given —
    at a batch, size and text length the graph was neither traced nor checked at."""
    built = request.getfixturevalue(f"tiny_flux_{variant}")
    model = diffusers.FluxTransformer2DModel.from_pretrained(built.source / "transformer").eval()
    rng = np.random.default_rng(5)
    b, c, h, w, L = 3, 4, 10, 14, 7
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    t = np.array([1000.0, 613.5, 12.25], np.float32)  # the scheduler's timesteps, sigma * 1000
    text = rng.standard_normal((b, L, 24)).astype(np.float32)
    pooled = rng.standard_normal((b, 32)).astype(np.float32)
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled}
    g = None
    if variant == "dev":
        g = feeds["guidance"] = np.array([3.5, 1.0, 6.0], np.float32)
    ours = _run_graph(built.bundle, "transformer", feeds)
    pipe = diffusers.FluxPipeline
    with torch.no_grad():
        packed = pipe._pack_latents(torch.from_numpy(x), b, c, h, w)
        ref = model(hidden_states=packed, timestep=torch.from_numpy(t) / 1000,
                    guidance=None if g is None else torch.from_numpy(g), pooled_projections=torch.from_numpy(pooled),
                    encoder_hidden_states=torch.from_numpy(text), txt_ids=torch.zeros(L, 3),
                    img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                    return_dict=False)[0]
        ref = pipe._unpack_latents(ref, h * 2, w * 2, 2).numpy()  # the tiny VAE's factor is 2
    assert ours.shape == ref.shape == (b, c, h, w)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("length", [5, 256, 512])
def test_t5_graph_is_dynamic_in_length(tiny_flux_schnell, length):
    """T5 was traced at 32 tokens; calls run 256 or 512 (max_sequence_length): relative attention must follow."""
    import transformers

    model = transformers.T5EncoderModel.from_pretrained(tiny_flux_schnell.source / "text_encoder_2").eval()
    backend = OrtBackend(Bundle.open(tiny_flux_schnell.bundle), "text_encoder_2")
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, (2, length)).astype(np.int32)
    ours = backend.run({"input_ids": ids})["last_hidden_state"]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_clip_graph_gives_the_pooled_output_flux_reads(tiny_flux_dev):
    import transformers

    model = transformers.CLIPTextModel.from_pretrained(tiny_flux_dev.source / "text_encoder").eval()
    backend = OrtBackend(Bundle.open(tiny_flux_dev.bundle), "text_encoder")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 77)).astype(np.int32)
    ours = backend.run({"input_ids": ids})["pooler_output"]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids).long(), output_hidden_states=False).pooler_output.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_max_sequence_length_is_recorded_and_checked(tiny_flux_schnell, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    with pytest.raises(ExportError, match=r"--max-sequence-length 513: expected an integer from 1 to 512"):
        export_pipeline(tiny_flux_schnell.source, tmp_path / "x", max_sequence_length=513)
    assert not (tmp_path / "x").exists()
    out = export_pipeline(tiny_flux_schnell.source, tmp_path / "short", max_sequence_length=64)
    assert Bundle.open(out).manifest.max_sequence_length == 64


def test_source_checks_name_the_problem(tiny_flux_schnell, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    src = tmp_path / "src"
    shutil.copytree(tiny_flux_schnell.source, src)
    index = json.loads((src / "model_index.json").read_text())
    bad = dict(index, text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    (src / "model_index.json").write_text(json.dumps(bad))
    with pytest.raises(ExportError, match=r"text_encoder_2 class 'CLIPTextModelWithProjection' is not supported; "
                                          r"expected one of \['T5EncoderModel'\]"):
        export_pipeline(src, tmp_path / "o1")
    (src / "model_index.json").write_text(json.dumps(index))
    (src / "tokenizer_2" / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"tokenizer_2/ has no tokenizer.json"):
        export_pipeline(src, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_max_sequence_length_is_refused_for_pipelines_without_t5(tiny_sd1_source, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    with pytest.raises(ExportError, match=r"--max-sequence-length applies to SD3 and FLUX pipelines"):
        export_pipeline(tiny_sd1_source, tmp_path / "x", max_sequence_length=77)


def test_full_size_presets_have_flux1_shapes():
    """flux-schnell / flux-dev are FLUX.1's configs; --depth cuts depth only (widths stay: per-block cost)."""
    from edgediff.export.random_flux import flux_spec

    dev, schnell = flux_spec("flux-dev"), flux_spec("flux-schnell", depth=2)
    assert dev.transformer["num_layers"] == 19 and dev.transformer["num_single_layers"] == 38
    assert dev.transformer["guidance_embeds"] and not schnell.transformer["guidance_embeds"]
    assert schnell.transformer["num_layers"] == 2 and schnell.transformer["num_single_layers"] == 4
    assert schnell.t5["num_layers"] == 2 and dev.t5["num_layers"] == 24 and dev.t5["d_model"] == 4096
    for spec in (dev, schnell):
        assert spec.transformer["attention_head_dim"] * spec.transformer["num_attention_heads"] == 3072
        assert spec.transformer["in_channels"] == 4 * spec.vae["latent_channels"] == 64
    assert dev.scheduler["use_dynamic_shifting"] and dev.scheduler["shift"] == 3.0
    assert not schnell.scheduler["use_dynamic_shifting"] and schnell.scheduler["shift"] == 1.0
    with pytest.raises(ValueError, match="--depth"):
        flux_spec("flux-dev", depth=20)
    with pytest.raises(ValueError, match="--depth applies to the full-width presets"):
        flux_spec("tiny-flux-dev", depth=1)


def test_cli_export_refuses_a_long_t5_limit_in_one_line(tiny_flux_schnell, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    r = CliRunner().invoke(main, ["export", str(tiny_flux_schnell.source), str(tmp_path / "out"),
                                  "--max-sequence-length", "600"])
    assert r.exit_code not in (0, 70), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]  # after the "exporting" line
    assert errors == [r.output.strip().splitlines()[-1]] and len(errors) == 1, r.output
    assert "--max-sequence-length 600: expected an integer from 1 to 512" in errors[0]
    assert not (tmp_path / "out").exists()
