"""Every scheduler at every step count the CLI accepts (1 to num_train_timesteps), numpy only: it runs to a finite
result, or refuses before any state changes with one InputError naming the most steps it can run. Where the refusals
fall is checked against diffusers in test_schedulers.py (they are exactly where diffusers raises or ends in NaN)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from edgediff.errors import InputError
from edgediff.schedulers import SCHEDULERS, make_scheduler
from edgediff.schedulers.config import SPACINGS, SchedulerConfig

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1, set_alpha_to_one=False, clip_sample=False)
ZERO_SNR = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
DIFFUSION = sorted(n for n, c in SCHEDULERS.items() if c.kind == "diffusion")  # flow ones: test_flow_schedulers.py
CONFIGS = [(name, dict(SD, timestep_spacing=s)) for name in DIFFUSION for s in SPACINGS]
CONFIGS += [(name, ZERO_SNR) for name in DIFFUSION if name != "pndm"]  # pndm refuses zero SNR outright


class Noise:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.seeds = (seed,)

    def standard_normal(self, shape):
        return self.rng.standard_normal(shape).astype(np.float32)


def sample_all_steps(sched) -> np.ndarray:
    """The whole denoising loop on (1, 1, 2, 2) arrays, with a random stand-in for the model's output."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 1, 2, 2)) * sched.init_noise_sigma).astype(np.float32)
    noise = Noise(1)
    for i in range(sched.begin_index, len(sched.timesteps)):
        assert np.isfinite(sched.scale_model_input(x, i)).all()
        eps = rng.standard_normal(x.shape).astype(np.float32)
        x = sched.step(eps, i, x, noise)
        assert np.isfinite(x).all(), f"{sched.name}: non-finite sample after step {i + 1} of {len(sched.timesteps)}"
    return x


def refused_most(sched, steps: int) -> int | None:
    """None if ``steps`` is accepted, else the maximum the InputError names (after checking its shape)."""
    try:
        sched.set_timesteps(steps)
    except InputError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(f"{sched.name}: {steps} steps ")
        found = re.search(r"at most (\d+) steps", msg)
        assert found, msg
        return int(found.group(1))
    return None


@pytest.mark.parametrize("steps", (1, 2, 999, 1000))
@pytest.mark.parametrize("name,cfg", CONFIGS, ids=lambda v: v if isinstance(v, str) else
                         f"{v['timestep_spacing']}{'-zero_snr' if v.get('rescale_betas_zero_snr') else ''}")
def test_every_scheduler_runs_or_refuses_up_front(name, cfg, steps):
    """Found as a new user: PNDM and DDIM at --steps 1000 (the documented maximum) raised IndexError, DPM++ 2M and
    UniPC at 999-1000 steps ended in NaN that was blamed on the UNet's precision."""
    sched = make_scheduler(name, SchedulerConfig.from_dict(cfg))
    most = refused_most(sched, steps)
    if most is None:
        sample_all_steps(sched)
        return
    assert 1 <= most < steps
    assert len(sched.timesteps) == 0  # refused before any state changed
    sched.set_timesteps(most)  # the maximum it names does run
    sample_all_steps(sched)


@pytest.mark.parametrize("name", ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm"))
def test_every_count_from_1_to_T_gives_a_schedule_without_repeats_or_is_refused(name):
    """All 1000 counts of SD's schedule, spacing by spacing: exactly the model calls asked for (PNDM: one more, its
    warm-up), every timestep within the model's range (Euler may read the last one twice, as diffusers does), and
    for the multistep solvers strictly decreasing sigmas, which they divide by the differences of."""
    for spacing in SPACINGS:
        sched = make_scheduler(name, SchedulerConfig.from_dict(dict(SD, timestep_spacing=spacing)))
        refused = []
        for n in range(1, SD["num_train_timesteps"] + 1):
            if refused_most(sched, n) is not None:
                refused.append(n)
                continue
            ts = np.asarray(sched.timesteps)
            assert len(ts) == n + (name == "pndm" and n > 1), (spacing, n)
            if name != "euler" and name != "euler_a":
                assert 0 <= ts.min() and ts.max() <= 999, (spacing, n)
            if name in ("dpmpp_2m", "unipc"):
                assert (np.diff(sched.sigmas[:-1]) < 0).all(), (spacing, n)
        # refusals are the few counts at the top that SD's steps_offset=1 or rounding cannot space (and LCM's limit)
        expected = {
            "ddim": {"leading": [1000]}, "pndm": {"leading": [1000]},
            "dpmpp_2m": {"leading": [999, 1000], "linspace": [1000]}, "unipc": {"leading": [999, 1000], "linspace": [1000]},
            "lcm": {s: list(range(51, 1001)) for s in SPACINGS},
        }
        assert refused == expected.get(name, {}).get(spacing, []), (name, spacing)


def test_karras_sigmas_run_every_count_up_to_T():
    """Karras sigmas are distinct at any count, so DPM++ 2M Karras refuses none; its timesteps may repeat (rounded
    from close sigmas), which the index-driven loop does not mind."""
    sched = make_scheduler("dpmpp_2m_karras", SchedulerConfig.from_dict(ZERO_SNR))
    for n in (998, 999, 1000):
        sched.set_timesteps(n)
        assert len(sched.timesteps) == n and (np.diff(sched.sigmas) < 0).all()


@pytest.mark.parametrize("bad", (0, -3, 1001, 2.5, "20", True, None))
def test_a_count_that_is_not_1_to_T_is_one_input_error(bad):
    for name in DIFFUSION:
        sched = make_scheduler(name, SchedulerConfig.from_dict(SD))
        with pytest.raises(InputError, match=rf"^{name}: num_inference_steps=.*; expected an integer from 1 to 1000"):
            sched.set_timesteps(bad)


def test_a_refused_count_keeps_the_schedule_already_set():
    sched = make_scheduler("ddim", SchedulerConfig.from_dict(SD))
    sched.set_timesteps(20)
    before = sched.timesteps.copy()
    with pytest.raises(InputError, match=r"^ddim: 1000 steps with timestep_spacing='leading' and steps_offset=1 reach "
                                         r"timestep 1000, past the model's last \(999\); it runs at most 999 steps"):
        sched.set_timesteps(1000)
    np.testing.assert_array_equal(sched.timesteps, before)
    assert sched.num_inference_steps == 20
