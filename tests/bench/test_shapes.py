"""The default model's world: dataset determinism and splits, caption parsing, and the pixel judge (>= 99 % per
attribute on ground-truth images, clean and with generation-like blur and noise)."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bench.shapes.dataset import (COLOURS, HELDOUT, SHAPES, all_scenes, canonical_caption, make_dataset,
                                           parse_prompt, render)
from edgediff.bench.shapes.judge import judge


def test_dataset_is_deterministic():
    a, ca, sa = make_dataset(3, 50)
    b, cb, sb = make_dataset(3, 50)
    assert np.array_equal(a, b) and ca == cb and sa == sb
    c, cc, _ = make_dataset(4, 50)
    assert not np.array_equal(a, c) and ca != cc
    assert a.shape == (50, 64, 64, 3) and a.dtype == np.uint8


def test_heldout_combinations_never_in_training():
    train, held = all_scenes("train"), all_scenes("heldout")
    assert not {(s.colour, s.shape) for s in train} & HELDOUT
    assert {(s.colour, s.shape) for s in held} == set(HELDOUT)
    assert {s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)
    _, _, scenes = make_dataset(0, 500, "train")
    assert not any(s.heldout for s in scenes)


def test_captions_parse_back():
    _, caps, scenes = make_dataset(5, 300)
    for c, s in zip(caps, scenes):
        assert parse_prompt(c) == s, c
    for s in all_scenes("heldout")[:50]:
        assert parse_prompt(canonical_caption(s)) == s


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


def test_render_draws_the_right_colour():
    s = all_scenes("train")[0]
    img = render(s)
    cx, cy = s.center()
    assert tuple(img[int(cy), int(cx)]) == pytest.approx(COLOURS[s.colour], abs=2)


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
