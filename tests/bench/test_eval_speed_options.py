"""`edgediff eval-default` with a speed option: every judged image is made with it, the --reference run without it
(so its PSNR column is the option's cost against the plain images of the same seeds), and a bad option is one line
before the table starts. On the built-in model, 2 prompts at 2 steps."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from edgediff.builtin_model import default_bundle
from edgediff.cli import main

FAST = ("--n", "2", "--split", "train", "--steps", "2")


def eval_default(*args):
    return CliRunner().invoke(main, ["eval-default", *FAST, *[str(a) for a in args]])


def psnr_of(output: str) -> float:
    return float(re.search(r"([0-9.]+) dB", output.splitlines()[-1]).group(1))


def test_the_option_reaches_the_judged_images_and_not_the_reference():
    same = eval_default("--cfg-cutoff", "1", "--reference", default_bundle())  # 1 never fires: the plain images
    cut = eval_default("--cfg-cutoff", "0", "--reference", default_bundle())  # guidance on the first step only
    assert same.exit_code == 0 and cut.exit_code == 0, same.output + cut.output
    assert "speed options: cfg_cutoff=0.0" in cut.output.splitlines()[0]
    assert psnr_of(same.output) == 100.0 and psnr_of(cut.output) < 60, cut.output


@pytest.mark.parametrize("args,match", [
    (["--cfg-cutoff", "2"], "cfg_cutoff=2.0; must be a number from 0 to 1"),
    (["--autoencode", "--decoder", "tiny"], "--autoencode judges the VAE round trip"),
    (["--cache-interval", "0"], "--cache-interval"),
])
def test_bad_options_are_one_line_before_the_table(args, match):
    r = eval_default(*args)
    assert r.exit_code == 2 and match in r.output and "steps, guidance" not in r.output, r.output
