"""PNDM's pseudo linear multistep (PLMS) sampler (Liu et al. 2022, eq. 12-13), as diffusers' PNDMScheduler with
skip_prk_steps=True — the way Stable Diffusion ships it. The Runge-Kutta warm-up (skip_prk_steps=false) is not
offered: the name "pndm" here always means PLMS, whatever the config says."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .alpha_bar import AlphaBarScheduler


class PNDM(AlphaBarScheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    DEFAULTS = dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=False)
    OVERRIDES = dict(skip_prk_steps=True)

    def __init__(self, config):
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"pndm: prediction_type={config.prediction_type!r}; expected one of ['epsilon', 'v_prediction']")
        if config.rescale_betas_zero_snr:
            # PLMS's transfer (eq. 9) divides by sqrt(alpha_bar_t), which a zero-terminal-SNR schedule makes 0 at
            # t = T; diffusers' PNDMScheduler has no such option and would sample another schedule than the model's.
            raise ConfigError("pndm cannot sample this model's zero-terminal-SNR schedule (rescale_betas_zero_snr): "
                              "choose --scheduler ddim, euler, euler_a, dpmpp_2m, unipc or lcm")
        super().__init__(config)
        self._ets: list[np.ndarray] = []
        self._counter = 0
        self._cur_sample = None

    def set_timesteps(self, n: int, *, mu=None, sigmas=None) -> None:
        n = self._check_steps(n, mu, sigmas)
        ts = self._spaced(n)[::-1]  # ascending
        # PLMS needs one extra model call at the start: the second-to-last timestep is repeated
        self.timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        self.num_inference_steps = n
        self._ets, self._counter, self._cur_sample = [], 0, None

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        stride = self.config.num_train_timesteps // self.num_inference_steps
        t = int(self.timesteps[i])
        prev_t = t - stride
        if self._counter != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:  # the repeated timestep: average it with the first (a 2nd-order warm-up, eq. 12)
            prev_t, t = t, t + stride
        ets = self._ets
        if len(ets) == 1 and self._counter == 0:
            e, self._cur_sample = model_output, sample
        elif len(ets) == 1 and self._counter == 1:
            e, sample, self._cur_sample = (model_output + ets[-1]) / 2, self._cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:  # 4th-order Adams-Bashforth combination of the last four eps (eq. 13)
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self._counter += 1
        return self._prev_sample(sample, t, prev_t, e)

    def _prev_sample(self, sample, t, prev_t, e):
        a_t, a_prev = self._alpha(t), self._alpha(prev_t)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            e = a_t**0.5 * e + b_t**0.5 * sample
        # PNDM eq. (9): the transfer part phi(x_t, e_t, t, t-delta)
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return (sample_coeff * sample - (a_prev - a_t) * e / denom).astype(np.float32)
