"""edgediff bench with a control image: every timed generation runs the bundle's ControlNet, so the step cost with
ControlNet can be set against the plain run of the same bundle (bench/scripts/issue19/controlnet_cost.sh)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.cli import main

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sd1_source):
    from controlnet_fixtures import tiny_controlnet_bundle

    return tiny_controlnet_bundle(tmp_path_factory, tiny_sd1_source)


def _bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


def test_bench_runs_with_a_control_image(built, tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    common = [built.bundle, "--steps", 2, "--runs", 1, "--warmup", 0]
    r = _bench("run", *common, "--control-image", tmp_path / "c.png", "--controlnet", "canny",
               "--json", tmp_path / "cn.json")
    assert r.exit_code == 0, r.output
    r = _bench("run", *common, "--json", tmp_path / "plain.json")
    assert r.exit_code == 0, r.output
    cn, plain = (json.loads((tmp_path / f).read_text())["results"][0] for f in ("cn.json", "plain.json"))
    assert cn["config"]["control_image"] == str(tmp_path / "c.png") and cn["config"]["controlnets"] == ["canny"]
    assert plain["config"]["control_image"] is None
    # one sample per model call (PNDM: steps + 1), the ControlNet inside each
    assert cn["stages"]["unet"]["n"] == plain["stages"]["unet"]["n"] >= 2
    r = _bench("run", *common, "--control-image", tmp_path / "c.png", "--controlnet", "tile")
    assert r.exit_code == 2 and "no ControlNet 'tile'; it has: canny, depth, pool" in r.output
    r = _bench("run", *common, "--control-image", tmp_path / "c.png", "--compare", "diffusers")
    assert r.exit_code == 2 and "--compare does not pass --control-image to diffusers" in r.output
