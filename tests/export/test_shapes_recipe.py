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
