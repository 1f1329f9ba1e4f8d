"""diffusers StableDiffusionXL[Img2Img]Pipeline -> ONNX bundle: the SDXL rows of the component table (optimum's
names), parity receipts, family detection, both tokenizers pinned, one PyTorch model in memory at a time, and the
SDXL source checks. Reference: diffusers 0.42 / transformers 5 on tiny random pipelines; graphs vs PyTorch at 1e-5."""
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


@pytest.fixture(scope="module")
def base(tiny_sdxl_base):
    return tiny_sdxl_base


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_refiner):
    return tiny_sdxl_refiner


def _names(specs):
    return [s.name for s in specs]


def test_base_bundle_has_optimum_sdxl_io_and_passing_receipts(base):
    b = Bundle.open(base.bundle)
    m = b.manifest
    assert m.family == "sdxl" and m.prediction_type == "epsilon" and m.text_max_length == 77
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    for comp in m.components.values():
        assert comp.parity is not None and comp.parity.passed and comp.parity.max_rel < 1e-4, (comp.name, comp.parity)
    # tiny towers: CLIP-L-like 32 wide, OpenCLIP-G-like 48 wide with a 24-wide projection, 3 layers each
    te, te2, unet = m.components["text_encoder"], m.components["text_encoder_2"], m.components["unet"]
    assert _names(te.outputs) == ["last_hidden_state", "pooler_output", "hidden_states.2"]
    assert te.output("hidden_states.2").shape == ("batch", "sequence", 32)
    assert _names(te2.outputs) == ["text_embeds", "last_hidden_state", "hidden_states.2"]
    assert te2.output("text_embeds").shape == ("batch", 24)
    assert te2.output("hidden_states.2").shape == ("batch", "sequence", 48)
    assert _names(unet.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.input("encoder_hidden_states").shape == ("batch", "sequence", 80)  # 32 + 48
    assert unet.input("text_embeds").shape == ("batch", 24)
    assert unet.input("time_ids").shape == ("batch", 6)
    assert b.verify() == [] and Manifest.from_json(m.to_json()) == m
    pinned = {f.path for f in m.files}
    for folder in ("tokenizer", "tokenizer_2"):
        assert {f"{folder}/vocab.json", f"{folder}/merges.txt", f"{folder}/special_tokens_map.json"} <= pinned
    assert json.loads((base.bundle / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert {"text_encoder/config.json", "text_encoder_2/config.json"} <= pinned
    assert b.config("vae_decoder/config.json")["force_upcast"] is True  # SDXL's VAE overflows in fp16
    assert b.model_index["force_zeros_for_empty_prompt"] is True
    assert m.provenance.source_class == "StableDiffusionXLPipeline"


def test_refiner_bundle_has_only_the_second_tower_and_five_time_ids(refiner):
    b = Bundle.open(refiner.bundle)
    m = b.manifest
    assert m.family == "sdxl-refiner"
    assert set(m.components) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert all(c.parity.passed for c in m.components.values())
    unet = m.components["unet"]
    assert unet.input("time_ids").shape == ("batch", 5)
    assert unet.input("encoder_hidden_states").shape == ("batch", "sequence", 48)
    assert not any(f.path.startswith("tokenizer/") for f in m.files)
    assert any(f.path == "tokenizer_2/vocab.json" for f in m.files)
    assert b.model_index["requires_aesthetics_score"] is True
    assert m.provenance.source_class == "StableDiffusionXLImg2ImgPipeline"
    assert b.verify() == []


def test_exporter_holds_one_pytorch_model_at_a_time(base):
    # Before each load nothing else is in memory; when ONNX Runtime opens a graph, its model is already freed
    # unless a later graph is traced from it (the VAE: decoder, then encoder).
    assert base.trace.events == [
        ("load", "text_encoder", ()), ("check", "text_encoder", ()),
        ("load", "text_encoder_2", ()), ("check", "text_encoder_2", ()),
        ("load", "unet", ()), ("check", "unet", ()),
        ("load", "vae", ()), ("check", "vae_decoder", ("vae",)), ("check", "vae_encoder", ()),
    ]


@pytest.mark.parametrize("component,cls_name", [("text_encoder", "CLIPTextModel"),
                                                ("text_encoder_2", "CLIPTextModelWithProjection")])
def test_exported_hidden_state_is_the_one_sdxl_reads(base, component, cls_name):
    """The graph's hidden_states.<layers-1> is transformers' hidden_states[-2] (what encode_prompt concatenates),
    and differs from the last layer's; text_embeds is the projected pooled output."""
    import torch
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(base.source / component).eval()
    backend = OrtBackend(Bundle.open(base.bundle), component)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 77))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = backend.run({"input_ids": ids.astype(np.int32)})
    np.testing.assert_allclose(out["hidden_states.2"], ref.hidden_states[-2].numpy(), atol=1e-5, rtol=0)
    assert np.abs(ref.hidden_states[-2].numpy() - ref.hidden_states[-1].numpy()).max() > 1e-2
    if component == "text_encoder_2":
        np.testing.assert_allclose(out["text_embeds"], ref.text_embeds.numpy(), atol=1e-5, rtol=0)


# -- the source checks ------------------------------------------------------------------------------------------
def _edited_source(base, tmp_path, **index_changes):
    src = tmp_path / "src"
    shutil.copytree(base.source, src)
    index = json.loads((src / "model_index.json").read_text())
    index.update(index_changes)
    (src / "model_index.json").write_text(json.dumps(index))
    return src


def test_sdxl_source_needs_the_second_tower(base, tmp_path):
    from edgediff.export.source import inspect_source

    src = _edited_source(base, tmp_path, text_encoder_2=None)
    with pytest.raises(ExportError, match="no 'text_encoder_2' component"):
        inspect_source(src)


def test_sdxl_source_text_encoder_and_tokenizer_come_together(base, tmp_path):
    from edgediff.export.source import inspect_source

    src = _edited_source(base, tmp_path, tokenizer=[None, None])
    with pytest.raises(ExportError, match="'tokenizer' null but not its partner"):
        inspect_source(src)


def test_sdxl_source_refuses_a_wrong_second_tower_class(base, tmp_path):
    from edgediff.export.source import inspect_source

    src = _edited_source(base, tmp_path, text_encoder_2=["transformers", "CLIPTextModel"])
    with pytest.raises(ExportError, match="text_encoder_2 class 'CLIPTextModel' is not supported"):
        inspect_source(src)


def test_source_lists_models_and_tokenizers(base, refiner):
    from edgediff.export.source import inspect_source

    s = inspect_source(base.source)
    assert s.sdxl and s.modules == ("text_encoder", "text_encoder_2", "unet", "vae")
    assert s.tokenizers == ("tokenizer", "tokenizer_2")
    r = inspect_source(refiner.source)
    assert r.sdxl and r.modules == ("text_encoder_2", "unet", "vae") and r.tokenizers == ("tokenizer_2",)


def test_full_size_presets_have_sdxl_and_sd_turbo_shapes():
    """The measurement presets, instantiated on the meta device (no memory): the parameter counts of SDXL base 1.0's
    UNet (2,567,463,684), CLIP ViT-L (123,060,480) and OpenCLIP ViT-bigG with projection (694,659,840)."""
    import diffusers
    import torch
    import transformers

    from edgediff.export.random_pipeline import PRESETS
    from edgediff.export.random_sdxl import CLIP_VOCAB_SIZE, sdxl_spec

    assert {"sdxl", "sdxl-turbo", "sd-turbo", "tiny-sdxl", "tiny-sdxl-refiner"} <= set(PRESETS)
    spec = sdxl_spec("sdxl")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**spec.unet)
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **spec.text_encoder))
        te2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, **spec.text_encoder_2))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(te), count(te2)) == (2_567_463_684, 123_060_480, 694_659_840)
    turbo = sdxl_spec("sdxl-turbo")
    assert turbo.scheduler_class == "EulerAncestralDiscreteScheduler"
    assert turbo.scheduler["timestep_spacing"] == "trailing" and turbo.unet["sample_size"] == 64
