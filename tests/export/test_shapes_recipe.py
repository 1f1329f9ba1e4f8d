"""The default model's training recipe, in its smoke mode: it runs, writes a diffusers pipeline that the real export
path accepts, and logs what the README says it logs. (The full run is ~40 minutes; its output is the shipped
bundle, which tests/runtime/test_default_model.py checks.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgediff.bundle.reader import Bundle
from edgediff.export.pipeline_export import export_pipeline

pytest.importorskip("diffusers")


@pytest.mark.slow
def test_smoke_training_exports_to_a_loadable_bundle(tmp_path):
    out = tmp_path / "pipe"
    r = subprocess.run([sys.executable, "-m", "edgediff.export.recipes.shapes.train", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["vae"] and log["unet"] and log["scaling_factor"] > 0
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert not out.with_name("pipe.work").exists()  # the scratch folder is cleaned up

    bundle = export_pipeline(out, tmp_path / "bundle")
    b = Bundle.open(bundle)
    assert b.verify() == []
    assert b.manifest.scaling_factor == pytest.approx(log["scaling_factor"], rel=1e-6)


@pytest.mark.slow
def test_vae_from_gives_the_weights_of_a_full_run(tmp_path):
    """Stage 2 draws from its own generator, so training it on a VAE that stage 1 wrote earlier reproduces the
    full run's text encoder and UNet byte for byte (the shipped model was trained this way)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    recipe = [sys.executable, "-m", "edgediff.export.recipes.shapes.train", "--smoke"]
    for args in (["--out", str(full)], ["--out", str(resumed), "--vae-from", str(full)]):
        r = subprocess.run(recipe + args, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (full / part).read_bytes() == (resumed / part).read_bytes(), part
    assert "reused" in json.loads((resumed / "train_log.json").read_text())["vae_stage"]


def test_timestep_curriculum():
    torch = pytest.importorskip("torch")
    from edgediff.export.recipes.shapes.train import sample_timesteps

    g = torch.Generator().manual_seed(0)
    early = torch.cat([sample_timesteps(s, 64, g, curriculum=10) for s in range(10)])
    late = torch.cat([sample_timesteps(s, 64, g, curriculum=10) for s in range(10, 60)])
    assert early.min() >= 900 and early.max() <= 999
    assert late.min() < 600 and late.max() <= 999 and late.dtype == torch.int64
    # half the batch from [600, 1000) plus the uniform half's share of it: ~70 % high-noise
    assert 0.6 < (late >= 600).float().mean() < 0.8
