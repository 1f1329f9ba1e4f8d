"""The built-in model's scene world (export/recipes/shapes/dataset.py): determinism, the held-out split, captions
that parse back, rendering. numpy only: runs without the [export] extra."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.export.recipes.shapes.dataset import (COLOURS, HELDOUT, SHAPES, all_scenes, canonical_caption,
                                                    make_dataset, parse_prompt, render)


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


def test_render_draws_the_right_colour():
    s = all_scenes("train")[0]
    img = render(s)
    cx, cy = s.center()
    assert tuple(img[int(cy), int(cx)]) == pytest.approx(COLOURS[s.colour], abs=2)
