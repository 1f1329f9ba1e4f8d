"""export --tiny-vae (export/components_tiny_vae.py): a diffusers AutoencoderTiny exported next to the VAE as
vae_decoder_tiny / vae_encoder_tiny, with parity receipts against the PyTorch module, and every refusal of a folder
that does not fit the pipeline (one line, before any export work)."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgediff.bundle.reader import Bundle
from edgediff.cli import main
from edgediff.errors import ExportError

pytest.importorskip("diffusers")

from tiny_vae_fixtures import SCALING, build_tiny_autoencoder, tiny_sd1_with_taesd  # noqa: E402


@pytest.fixture(scope="module")
def built(tiny_sd1_source, tmp_path_factory):
    return tiny_sd1_with_taesd(tiny_sd1_source, tmp_path_factory)


def test_bundle_holds_the_tiny_autoencoder_with_receipts(built):
    b = Bundle.open(built.bundle)
    m = b.manifest
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "vae_decoder_tiny",
                                 "vae_encoder_tiny"}
    for name in ("vae_decoder_tiny", "vae_encoder_tiny"):
        r = m.components[name].parity
        assert r is not None and r.passed and r.max_rel < 1e-4 and "AutoencoderTiny" in r.reference, (name, r)
    dec, enc = m.components["vae_decoder_tiny"], m.components["vae_encoder_tiny"]
    assert [s.name for s in dec.inputs] == ["latent_sample"] and [s.name for s in dec.outputs] == ["sample"]
    assert dec.input("latent_sample").shape == ("batch", 4, "height", "width")
    assert [s.name for s in enc.inputs] == ["sample"] and [s.name for s in enc.outputs] == ["latents"]
    cfg = b.config("vae_decoder_tiny/config.json")  # pinned: the runtime reads the scaling factor from it
    assert cfg["_class_name"] == "AutoencoderTiny" and cfg["scaling_factor"] == SCALING
    assert (m.latent_channels, m.vae_scale_factor, m.scaling_factor) == (4, 2, 0.3)  # still the VAE's
    assert b.verify() == []


def test_without_the_option_nothing_changes(tiny_sd1_bundle):
    assert not Bundle.open(tiny_sd1_bundle).has("vae_decoder_tiny")


def _refused(source, taesd, out, match, **kw):
    from edgediff.export.pipeline_export import export_pipeline

    with pytest.raises(ExportError, match=match) as info:
        export_pipeline(source, out, tiny_vae=taesd, **kw)
    assert "\n" not in str(info.value)
    assert not out.exists()  # refused before anything was written


def test_refusals_are_one_line_before_any_work(tiny_sd1_source, tmp_path):
    out = tmp_path / "out"
    _refused(tiny_sd1_source, tmp_path / "nope", out, "not a folder")
    _refused(tiny_sd1_source, tiny_sd1_source / "vae", out, "holds a 'AutoencoderKL', not a diffusers AutoencoderTiny")
    (tmp_path / "empty").mkdir()
    _refused(tiny_sd1_source, tmp_path / "empty", out, "config.json")
    wide = build_tiny_autoencoder(tmp_path / "c16", latent_channels=16)
    _refused(tiny_sd1_source, wide, out, "16 latent channels and the pipeline's VAE 4")
    deep = build_tiny_autoencoder(tmp_path / "f8", encoder_block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                                  num_decoder_blocks=(1, 1, 1, 1))
    _refused(tiny_sd1_source, deep, out, "maps a latent cell to 8x8 pixels .* VAE to 2x2")


def test_pickle_weights_need_allow_pickle(tiny_sd1_source, tmp_path):
    import torch
    from safetensors.torch import load_file

    taesd = build_tiny_autoencoder(tmp_path / "taesd")
    weights = taesd / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), taesd / "diffusion_pytorch_model.bin")
    weights.unlink()
    _refused(tiny_sd1_source, taesd, tmp_path / "out", "is a pickle file")
    shutil.rmtree(taesd)
    taesd.mkdir()
    (taesd / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 4,
                                                   "encoder_block_out_channels": [8, 8],
                                                   "decoder_block_out_channels": [8, 8]}))
    _refused(tiny_sd1_source, taesd, tmp_path / "out", "has no weights")


def test_cli_export_tiny_vae(tiny_sd1_source, tmp_path):
    r = CliRunner().invoke(main, ["export", str(tiny_sd1_source), str(tmp_path / "out"), "--tiny-vae",
                                  str(tmp_path / "missing")])
    assert r.exit_code != 0 and r.output.strip().splitlines()[-1].startswith("error: --tiny-vae"), r.output
    assert "Traceback" not in r.output
