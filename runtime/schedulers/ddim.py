"""DDIM (Song et al. 2021), deterministic (eta = 0), as diffusers' DDIMScheduler."""
from __future__ import annotations

import numpy as np

from . import schedule as S
from .alpha_bar import AlphaBarScheduler


class DDIM(AlphaBarScheduler):
    name = "ddim"
    diffusers_class = "DDIMScheduler"
    DEFAULTS = dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=True,
                    clip_sample_range=1.0, rescale_betas_zero_snr=False)

    def set_timesteps(self, n: int, *, mu=None, sigmas=None) -> None:
        n = self._check_steps(n, mu, sigmas)
        self.num_inference_steps = n
        self.timesteps = self._spaced(n)

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        t = int(self.timesteps[i])
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps  # diffusers' stride, any spacing
        a_t, a_prev = self._alpha(t), self._alpha(prev_t)
        # 1. x0 and eps from the model output (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps)
        x0, eps = S.to_x0_eps(model_output, sample, a_t**0.5, (1 - a_t) ** 0.5, self.config.prediction_type)
        if self.opt("clip_sample"):
            r = self.opt("clip_sample_range")
            x0 = np.clip(x0, -r, r)
        # 2. DDIM eq. (12) with sigma_t = 0: x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).astype(np.float32)
