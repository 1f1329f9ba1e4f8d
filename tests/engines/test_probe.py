"""Input capture for calibration and parity (edgediff.engines.probe)."""
from __future__ import annotations

import warnings

from edgediff.builtin_model import default_bundle
from edgediff.engines.probe import capture


def test_capture_records_every_call_and_keeps_the_terminal_quiet():
    long_prompt = "a photo of a red apple on a wooden table, " * 4  # > the built-in model's 24 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the truncation warning would fail the test
        got = capture(default_bundle(), [long_prompt], steps=2, guidance_scale=5.0)
    assert len(got.feeds["unet"]) >= 2 and len(got.feeds["text_encoder"]) == 1
    assert not any(w for w in warnings.filters if w[0] == "ignore" and "longer than" in str(w[1]))  # not leaked
