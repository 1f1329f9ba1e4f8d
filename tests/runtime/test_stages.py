"""NaN/Inf and broken outputs are reported by the stage that made them (runtime/stages.py and the pipeline's
per-stage checks), never as "latents became NaN at step 1", and a constant image is never written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff import Pipeline
from edgediff.errors import NonFiniteError


class _Poison:
    """Wraps a backend and replaces its first output by ``fill`` (NaN, a huge value, a constant)."""

    def __init__(self, inner, fill):
        self.inner, self.fill = inner, fill
        self.component, self.inputs, self.outputs = inner.component, inner.inputs, inner.outputs

    def run(self, feeds):
        out = dict(self.inner.run(feeds))
        first = self.outputs[0].name
        out[first] = np.full_like(out[first], self.fill)
        return out

    def close(self):
        self.inner.close()


def _pipe(bundle, target: str, fill) -> Pipeline:
    pipe = Pipeline.load(bundle)
    pipe.components.wrap(lambda name, b: _Poison(b, fill) if name == target else b)
    return pipe


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_nan_is_reported_by_the_component_that_made_it(tiny_sd1_bundle, component):
    with _pipe(tiny_sd1_bundle, component, np.nan) as pipe:
        with pytest.raises(NonFiniteError, match=f"^{component} produced NaN/Inf") as err:
            pipe("a red circle", num_inference_steps=2, seed=0, scheduler="euler")
    assert "step" not in str(err.value)  # not blamed on the denoising loop
    assert "fp32 graph" in str(err.value)  # an fp32 bundle is not told to "try an fp32 bundle"


def test_nan_from_the_vae_encoder_names_it(tiny_sd1_bundle, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
    with _pipe(tiny_sd1_bundle, "vae_encoder", np.nan) as pipe:
        with pytest.raises(NonFiniteError, match="^vae_encoder produced NaN/Inf"):
            pipe("x", image=tmp_path / "init.png", num_inference_steps=2, seed=0)


def test_overflow_in_the_scheduler_update_names_the_scheduler(tiny_sd1_bundle):
    # finite model outputs so large that the Euler update overflows float32
    with _pipe(tiny_sd1_bundle, "unet", 3e38) as pipe:
        with pytest.raises(NonFiniteError, match="the euler scheduler produced NaN/Inf at step 1 of 2"):
            pipe("x", num_inference_steps=2, seed=0, scheduler="euler", guidance_scale=1.0)


@pytest.mark.parametrize("value", [1.0, -1.0, 5.0, 0.25])
def test_a_constant_image_is_refused(tiny_sd1_bundle, value):
    """All white (+1 and saturating), all black (-1) or one flat colour: a broken decoder, not a picture."""
    with _pipe(tiny_sd1_bundle, "vae_decoder", value) as pipe:
        with pytest.raises(NonFiniteError, match="vae_decoder returned a constant image"):
            pipe("x", num_inference_steps=1, seed=0)
