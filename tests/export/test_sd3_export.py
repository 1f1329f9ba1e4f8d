"""diffusers StableDiffusion3Pipeline -> ONNX bundle (export/components_sd3.py): the SD3 rows (CLIP-L/G with
projection, optional T5, the MMDiT transformer), parity receipts, family detection, T5's tokenizer and
max_sequence_length in the manifest, one PyTorch model in memory at a time, and the SD3 source checks. Reference:
diffusers 0.42 / transformers 5 on tiny random pipelines (tests/sdxl_fixtures.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgediff.bundle.manifest import Manifest
from edgediff.bundle.reader import Bundle
from edgediff.errors import ExportError

pytest.importorskip("diffusers")

from sdxl_fixtures import OrtBackend  # noqa: E402


def _names(specs):
    return [s.name for s in specs]


def test_bundle_has_the_sd3_io_and_passing_receipts(tiny_sd3):
    b = Bundle.open(tiny_sd3.bundle)
    m = b.manifest
    assert m.family == "sd3" and m.prediction_type == "flow" and m.text_max_length == 77
    assert m.max_sequence_length == 256 and m.defaults.steps == 28 and b.default_guidance == 7.0
    assert m.shift_factor == pytest.approx(0.0609) and m.scaling_factor == pytest.approx(1.5305)
    assert set(m.components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder",
                                 "vae_encoder"}
    assert b.denoiser == "transformer" and b.size_multiple == 4  # VAE factor 2 x patch size 2
    for comp in m.components.values():
        assert comp.parity is not None and comp.parity.passed and comp.parity.max_rel < 1e-4, (comp.name, comp.parity)
    te, te2, te3, tr = (m.components[n] for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"))
    assert _names(te.outputs) == ["text_embeds", "hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert te.output("hidden_states.2").shape == ("batch", "sequence", 16) and te.output("text_embeds").shape == ("batch", 12)
    assert te2.output("hidden_states.2").shape == ("batch", "sequence", 24) and te2.output("text_embeds").shape == ("batch", 20)
    assert te3.output("last_hidden_state").shape == ("batch", "sequence", 48)
    assert _names(tr.inputs) == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
    assert tr.input("sample").shape == ("batch", 16, "height", "width") and m.latent_channels == 16
    assert tr.input("encoder_hidden_states").shape == ("batch", "sequence", 48)  # T5's width = joint_attention_dim
    assert tr.input("pooled_projections").shape == ("batch", 32)  # 12 + 20
    # the transformer was checked at another batch, a non-square size and a shorter text than it was traced with
    assert tr.parity.inputs["sample"] == [1, 16, 16, 12] and tr.parity.inputs["encoder_hidden_states"] == [1, 77 + 128, 48]
    assert b.verify() == [] and Manifest.from_json(m.to_json()) == m
    pinned = {f.path for f in m.files}
    assert {"tokenizer_3/tokenizer.json", "transformer/config.json", "text_encoder_3/config.json"} <= pinned
    assert b.config("transformer/config.json")["_class_name"] == "SD3Transformer2DModel"


def test_bundle_without_t5_has_neither_encoder_nor_tokenizer(tiny_sd3_no_t5):
    b = Bundle.open(tiny_sd3_no_t5.bundle)
    assert b.manifest.family == "sd3" and "text_encoder_3" not in b.manifest.components
    assert not any(f.path.startswith("tokenizer_3/") for f in b.manifest.files)
    assert b.manifest.max_sequence_length == 256  # the zeros diffusers feeds in T5's place have this length
    assert b.verify() == []


def test_exporter_holds_one_pytorch_model_at_a_time(tiny_sd3):
    assert tiny_sd3.trace.events == [
        ("load", "text_encoder", ()), ("check", "text_encoder", ()),
        ("load", "text_encoder_2", ()), ("check", "text_encoder_2", ()),
        ("load", "text_encoder_3", ()), ("check", "text_encoder_3", ()),
        ("load", "transformer", ()), ("check", "transformer", ()),
        ("load", "vae", ()), ("check", "vae_decoder", ("vae",)), ("check", "vae_encoder", ()),
    ]


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_exported_clip_states_are_the_ones_sd3_reads(tiny_sd3, component):
    """hidden_states.<layers-1-k> is transformers' hidden_states[-(k + 2)] (what _get_clip_prompt_embeds takes with
    clip_skip k, None = 0) and differs from the last layer's; text_embeds is the projected pooled output (its [0])."""
    import torch
    import transformers

    model = transformers.CLIPTextModelWithProjection.from_pretrained(tiny_sd3.source / component).eval()
    backend = OrtBackend(Bundle.open(tiny_sd3.bundle), component)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 77))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = backend.run({"input_ids": ids.astype(np.int32)})
    for k in range(3):
        np.testing.assert_allclose(out[f"hidden_states.{2 - k}"], ref.hidden_states[-(k + 2)].numpy(), atol=1e-5, rtol=0)
    assert np.abs(ref.hidden_states[-2].numpy() - ref.hidden_states[-1].numpy()).max() > 1e-2
    np.testing.assert_allclose(out["text_embeds"], ref[0].numpy(), atol=1e-5, rtol=0)


def test_exported_t5_runs_other_lengths(tiny_sd3):
    """T5's sequence axis is dynamic (calls choose max_sequence_length): the graph at 7 tokens equals transformers'."""
    import torch
    import transformers

    model = transformers.T5EncoderModel.from_pretrained(tiny_sd3.source / "text_encoder_3").eval()
    backend = OrtBackend(Bundle.open(tiny_sd3.bundle), "text_encoder_3")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 7))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))[0].numpy()
    np.testing.assert_allclose(backend.run({"input_ids": ids.astype(np.int32)})["last_hidden_state"], ref,
                               atol=1e-5, rtol=0)


def test_max_sequence_length_is_recorded_and_checked(tiny_sd3_no_t5, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main
    from edgediff.export.pipeline_export import export_pipeline

    r = CliRunner().invoke(main, ["export", str(tiny_sd3_no_t5.source), str(tmp_path / "b"), "--max-sequence-length", "77"])
    assert r.exit_code == 0, r.output
    assert Bundle.open(tmp_path / "b").manifest.max_sequence_length == 77
    r = CliRunner().invoke(main, ["export", str(tiny_sd3_no_t5.source), str(tmp_path / "c"), "--max-sequence-length", "600"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code not in (0, 70) and lines[-1].startswith("error: --max-sequence-length 600: expected an integer")
    for bad in (0, 513, True, "256"):
        with pytest.raises(ExportError, match="--max-sequence-length"):
            export_pipeline(tiny_sd3_no_t5.source, tmp_path / "c", max_sequence_length=bad)
        assert not (tmp_path / "c").exists()


# -- the source checks ------------------------------------------------------------------------------------------
def _edited_source(built, tmp_path, **index_changes):
    src = tmp_path / "src"
    shutil.copytree(built.source, src)
    index = json.loads((src / "model_index.json").read_text())
    index.update(index_changes)
    (src / "model_index.json").write_text(json.dumps(index))
    return src


def test_source_lists_models_and_tokenizers(tiny_sd3, tiny_sd3_no_t5):
    from edgediff.export.source import inspect_source

    s = inspect_source(tiny_sd3.source)
    assert s.modules == ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
    assert s.tokenizers == ("tokenizer", "tokenizer_2", "tokenizer_3")
    assert s.classes["transformer"] == ("diffusers", "SD3Transformer2DModel")
    n = inspect_source(tiny_sd3_no_t5.source)
    assert "text_encoder_3" not in n.modules and n.tokenizers == ("tokenizer", "tokenizer_2")


def test_an_img2img_folder_is_an_sd3_source(tiny_sd3, tmp_path):
    from edgediff.export.source import inspect_source

    s = inspect_source(_edited_source(tiny_sd3, tmp_path, _class_name="StableDiffusion3Img2ImgPipeline"))
    assert s.pipeline_class == "StableDiffusion3Img2ImgPipeline" and "transformer" in s.modules


@pytest.mark.parametrize("changes,message", [
    (dict(tokenizer_3=[None, None]), "'tokenizer_3' null but not its partner"),
    (dict(text_encoder_2=None), "no 'text_encoder_2' component"),
    (dict(text_encoder_2=["transformers", "CLIPTextModel"]), "text_encoder_2 class 'CLIPTextModel' is not supported"),
    (dict(transformer=["diffusers", "FluxTransformer2DModel"]), "transformer class 'FluxTransformer2DModel'"),
])
def test_sd3_source_problems_are_one_line(tiny_sd3, tmp_path, changes, message):
    from edgediff.export.source import inspect_source

    with pytest.raises(ExportError, match=message):
        inspect_source(_edited_source(tiny_sd3, tmp_path, **changes))


def test_t5_tokenizer_needs_its_tokenizer_json(tiny_sd3, tmp_path):
    from edgediff.export.source import inspect_source

    src = _edited_source(tiny_sd3, tmp_path)
    (src / "tokenizer_3" / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="tokenizer_3/ has no tokenizer.json"):
        inspect_source(src)


def test_random_pipeline_depth_and_full_size_shapes(tmp_path):
    """--depth sets the transformer's block count; the measurement presets instantiated on the meta device (no
    memory): SD3-medium's transformer is 2,028,328,000 parameters (the "2B" of its model card), SD3.5-medium's
    2.24 B plus its 384x384 position-embedding buffer (the card's 2.5 B)."""
    import diffusers
    import torch

    from edgediff.export.random_pipeline import PRESETS, build_random_pipeline
    from edgediff.export.random_sd3 import sd3_spec

    assert {"tiny-sd3", "tiny-sd3-no-t5", "sd3", "sd35m"} <= set(PRESETS)
    src = build_random_pipeline(tmp_path / "d1", "tiny-sd3-no-t5", depth=1)
    assert json.loads((src / "transformer" / "config.json").read_text())["num_layers"] == 1
    with pytest.raises(ValueError, match="--depth applies to the transformer presets"):
        build_random_pipeline(tmp_path / "x", "tiny-sd1", depth=2)
    counts = {}
    for preset in ("sd3", "sd35m"):
        spec = sd3_spec(preset)
        assert spec.t5 is None and spec.transformer["num_layers"] == 24 and spec.vae["latent_channels"] == 16
        with torch.device("meta"):
            model = diffusers.SD3Transformer2DModel(**spec.transformer)
        counts[preset] = sum(p.numel() for p in model.parameters())
    assert counts["sd3"] == 2_028_328_000 and 2.2e9 < counts["sd35m"] < 2.3e9
    assert sd3_spec("sd35m", depth=4).transformer["dual_attention_layers"] == (0, 1, 2, 3)
