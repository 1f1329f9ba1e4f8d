"""The default model's eval: the pixel judge (>= 99 % per attribute on ground-truth images, clean and with
generation-like blur and noise), PSNR, and the evaluation itself -- all without torch. (The scene world it judges,
export/recipes/shapes/dataset.py, is tested in tests/export/test_shapes_dataset.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bench.shapes.judge import judge
from edgediff.export.recipes.shapes.dataset import all_scenes, make_dataset


def _blur_noise(x: np.ndarray, rng) -> np.ndarray:
    y = x.astype(np.float32) + rng.normal(0, 6, x.shape)
    y = (y + np.roll(y, 1, 0) + np.roll(y, 1, 1) + np.roll(y, -1, 0) + np.roll(y, -1, 1)) / 5
    return np.clip(y, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_judge_on_ground_truth(split):
    images, _, scenes = make_dataset(11, 600, split)
    rng = np.random.default_rng(0)
    hits = {k: 0 for k in ("shape", "colour", "size", "position")}
    total = 0
    for x, s in zip(images, scenes):
        for img in (x, _blur_noise(x, rng)):
            v = judge(img).check(s)
            total += 1
            for k in hits:
                hits[k] += v[k]
    for k, h in hits.items():
        assert h / total >= 0.99, f"{k}: {h / total:.3f}"


def test_judge_on_empty_image():
    v = judge(np.full((64, 64, 3), 128, np.uint8))
    assert v.shape is None and not any(v.check(all_scenes("train")[0]).values())


def test_eval_imports_no_torch():
    """eval-default runs where torch is not installed: the eval, and the dataset it imports from the export package,
    must not pull torch in (nor may the export package's __init__ files)."""
    import subprocess
    import sys

    code = ("import sys, edgediff.bench.shapes.evaluate, edgediff.bench.shapes.judge; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'diffusers'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_psnr():
    from edgediff.bench.shapes.evaluate import psnr

    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48
    assert abs(psnr(a, b) - 10 * np.log10(48)) < 1e-9


def test_evaluate_against_a_reference_reports_psnr(tiny_sd1_bundle):
    from edgediff.bench.shapes.evaluate import EvalSettings, evaluate
    from edgediff.pipeline import Pipeline

    with Pipeline.load(tiny_sd1_bundle) as p:
        r = evaluate(p, "heldout", EvalSettings(n=3, steps=1, batch=2), reference=p)
    assert r["n"] == 3 and r["psnr"] == 100.0 and 0 <= r["all"] <= 1


def test_cli_eval_default_autoencode(tiny_sd1_bundle):
    """--autoencode prints the round trip's table; with --reference it is one line naming the conflict."""
    from click.testing import CliRunner

    from edgediff.cli import main

    r = CliRunner().invoke(main, ["eval-default", "--autoencode", "--n", "3", "--split", "heldout"])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if line.startswith("heldout")]
    assert len(rows) == 1 and rows[0][1] == "3" and rows[0][-1] == "dB"
    assert "VAE round trip" in r.output
    r = CliRunner().invoke(main, ["eval-default", "--autoencode", "--reference", str(tiny_sd1_bundle)])
    assert r.exit_code != 0 and "drop --reference" in r.output and "Traceback" not in r.output
