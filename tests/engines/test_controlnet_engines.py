"""edgediff optimize on a ControlNet bundle: the ControlNets and the residual UNet get real parity inputs (the
capture runs a generation with a control image), so they are optimized and checked like the other graphs, and the
derived bundle's ControlNet images stay those of the parent."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.bundle.reader import Bundle
from edgediff.pipeline import Pipeline

pytest.importorskip("diffusers")


def test_optimize_covers_the_controlnet_graphs(tmp_path_factory, tiny_sd1_source, tmp_path):
    from controlnet_fixtures import tiny_controlnet_bundle
    from PIL import Image

    from edgediff.engines.optimize import optimize_bundle

    parent = tiny_controlnet_bundle(tmp_path_factory, tiny_sd1_source).bundle
    out = optimize_bundle(parent, tmp_path / "opt", target="cpu")
    b = Bundle.open(out)
    assert b.verify() == []
    for name in ("controlnet_canny", "controlnet_depth", "controlnet_pool", "unet_controlnet"):
        comp = b.component(name)
        assert comp.optimized_for == "cpu" and comp.parity.passed and comp.parity.reference.startswith("parent")
    control = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=3, seed=5, output_type="np", control_image=[control, control],
              controlnets=["canny", "depth"], guess_mode=True)
    with Pipeline.load(parent) as p0, Pipeline.load(out) as p1:
        a, c = p0("a red circle", **kw).images[0], p1("a red circle", **kw).images[0]
    assert np.abs(a - c).max() < 1e-3


def test_static_optimize_of_a_controlnet_bundle_is_one_line(tmp_path_factory, tiny_sd1_source, tmp_path):
    from controlnet_fixtures import tiny_controlnet_bundle

    from edgediff.engines.optimize import optimize_bundle, parse_static
    from edgediff.errors import InputError

    parent = tiny_controlnet_bundle(tmp_path_factory, tiny_sd1_source).bundle
    with pytest.raises(InputError, match=r"--static does not fix the ControlNet graphs \(.*unet_controlnet\)") as e:
        optimize_bundle(parent, tmp_path / "static", target="cpu", static=parse_static("1x16x16"))
    assert "\n" not in str(e.value) and not (tmp_path / "static").exists()
