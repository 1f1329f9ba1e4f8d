"""The default model's training recipe, in its smoke mode: it runs, writes a diffusers pipeline that the real export
path accepts, and logs what the README says it logs. (The full run is ~40 minutes; its output is the shipped
bundle, which tests/runtime/test_default_model.py checks.)"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.export.pipeline_export import export_pipeline

pytest.importorskip("diffusers")


RECIPE = [sys.executable, "-m", "edgediff.export.recipes.shapes.train", "--smoke"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One smoke run of the whole recipe, shared by the tests below (each run is ~20 s of a core)."""
    out = tmp_path_factory.mktemp("recipe") / "full"
    r = subprocess.run(RECIPE + ["--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_smoke_training_exports_to_a_loadable_bundle(full_run, tmp_path):
    out = full_run
    log = json.loads((out / "train_log.json").read_text())
    assert log["vae"] and log["unet"] and log["scaling_factor"] > 0
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    assert not out.with_name("full.work").exists()  # the scratch folder is cleaned up

    bundle = export_pipeline(out, tmp_path / "bundle")
    b = Bundle.open(bundle)
    assert b.verify() == []
    assert b.manifest.scaling_factor == pytest.approx(log["scaling_factor"], rel=1e-6)


@pytest.mark.slow
def test_reused_stages_give_the_weights_of_a_full_run(full_run, tmp_path):
    """Each stage draws from its own generator, so stage 2 on a VAE written earlier (--vae-from), and the whole
    pipeline assembled from earlier stages (--vae-from + --unet-from), reproduce a full run byte for byte -- the
    shipped model was assembled this way. Stage 1b (decoder refinement) leaves the encoder, hence what stage 2
    trains on, unchanged: a run without it has the same encoder and UNet, and another decoder."""
    from safetensors.numpy import load_file

    full = full_run
    runs = {"resumed": ["--vae-from", str(full)], "assembled": ["--vae-from", str(full), "--unet-from", str(full)],
            "no-1b": ["--decoder-steps", "0"]}
    # two at a time, as CI has two cores (each run is mostly one core's worth of imports and small training steps)
    for wave in (("resumed", "no-1b"), ("assembled",)):
        procs = {out: subprocess.Popen(RECIPE + ["--out", str(tmp_path / out)] + runs[out], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True) for out in wave}
        for out, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, (out, err[-2000:])
    parts = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "vae/diffusion_pytorch_model.safetensors")
    for out in ("resumed", "assembled"):
        for part in parts:
            assert (full / part).read_bytes() == (tmp_path / out / part).read_bytes(), (out, part)
    full_log = json.loads((full / "train_log.json").read_text())
    assembled_log = json.loads((tmp_path / "assembled" / "train_log.json").read_text())
    assert "reused" in assembled_log["vae_stage"] and "reused" in assembled_log["unet_stage"]
    assert assembled_log["decoder"] == full_log["decoder"] and full_log["decoder"][-1]["step"] == 2  # 3 steps

    assert (full / parts[0]).read_bytes() == (tmp_path / "no-1b" / parts[0]).read_bytes()
    with_1b, without = (load_file(str(d / parts[2])) for d in (full, tmp_path / "no-1b"))
    for name, w in with_1b.items():
        same = np.array_equal(w, without[name])
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name


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


def test_vae_loss_gives_shape_and_background_half_each():
    """A small cross (1.7 % of the pixels) weighs as much in the VAE's loss as its background, like a large one."""
    torch = pytest.importorskip("torch")
    from edgediff.export.recipes.shapes.dataset import Scene, render
    from edgediff.export.recipes.shapes.train import shape_balanced_weight, to_tensor

    scenes = [Scene("cross", "green", "small", "middle center", "gray"),
              Scene("square", "red", "large", "top left", "white")]
    x = to_tensor(np.stack([render(s) for s in scenes]))
    w = shape_balanced_weight(x)
    assert w.shape == (2, 1, 64, 64)
    fg = w > 1
    assert 0.01 < fg[0].float().mean() < 0.03 and 0.05 < fg[1].float().mean() < 0.12
    for i in range(2):
        assert float((w[i] * fg[i]).sum() / w[i].sum()) == pytest.approx(0.5, abs=1e-3)
    assert torch.all(w[~fg] == 1)
