"""The LCM scheduler against diffusers' LCMScheduler, step by step, in the two configs it is used with here: an LCM's
own (LCM_Dreamshaper_v7's scheduler_config.json, as export/random_lcm.py writes it: set_alpha_to_one, steps_offset 1)
and LCM-LoRA's (``LCMScheduler.from_config(sd_pipe.scheduler.config)``: SD 1.5's PNDM config, set_alpha_to_one
false), at the LCM step counts 1-8 and the 50-step limit. tests/runtime/test_schedulers.py covers the options.

Tolerance, at every step (fp32), as test_schedulers.py: relative L2 <= 1e-5, worst element within 5e-5 of the
largest |theirs|; the timesteps exactly.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff.errors import InputError
from edgediff.schedulers import make_scheduler
from edgediff.schedulers.config import SchedulerConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.export.random_lcm import LCM_SCHEDULER  # noqa: E402

SD15_PNDM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
CONFIGS = {"lcm": ("LCMScheduler", LCM_SCHEDULER), "lcm-lora": ("PNDMScheduler", SD15_PNDM)}


def pair(config: str):
    cls, kwargs = CONFIGS[config]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = getattr(diffusers, cls).from_config(kwargs)  # as from a scheduler_config.json
        ref = diffusers.LCMScheduler.from_config(source.config)
    return ref, make_scheduler("lcm", SchedulerConfig.from_dict(dict(source.config)))


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 50])
def test_lcm_steps_match_diffusers(config, steps):
    ref, ours = pair(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    gen = torch.Generator().manual_seed(3)

    class Noise:  # what diffusers' step draws from the same generator
        g = torch.Generator().manual_seed(3)

        def standard_normal(self, shape):
            return torch.randn(tuple(shape), generator=self.g).numpy()

    noise = Noise()
    for i, t in enumerate(ref.timesteps):
        eps = (np.random.default_rng(100 + i).standard_normal(x.shape) + 0.1 * np.tanh(x)).astype(np.float32)
        xr = ref.step(torch.from_numpy(eps), t, xr, generator=gen).prev_sample
        x = ours.step(eps, i, x, noise)
        theirs = xr.numpy()
        rel = np.linalg.norm(x - theirs) / np.linalg.norm(theirs)
        worst = np.abs(x - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-5 and worst <= 5e-5, f"{config} step {i}/{steps}: rel L2 {rel:.2e}, worst {worst:.2e}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_more_steps_than_the_distillation_schedule_are_refused_as_diffusers_does(config):
    ref, ours = pair(config)
    with pytest.raises(ValueError):
        ref.set_timesteps(51)
    with pytest.raises(InputError, match="51 steps exceed the 50 steps this model was distilled with"):
        ours.set_timesteps(51)


@pytest.mark.parametrize("strength", [0.02, 0.3, 0.5, 0.75, 0.999, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 15, 16, 37])
def test_img2img_strength_picks_the_timesteps_diffusers_picks_or_refuses_where_it_does(strength, steps):
    """LatentConsistencyModelImg2ImgPipeline's set_timesteps(steps, strength=s): steps from the first
    int(50 * s) distillation timesteps; where that is fewer than the steps diffusers raises, and so do we."""
    ref, ours = pair("lcm")
    try:
        ref.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(InputError, match=f"{steps} steps with strength {strength} exceed the"):
            ours.set_timesteps(steps, strength=strength)
        return
    ours.set_timesteps(steps, strength=strength)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
