"""Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 3), as diffusers' LCMScheduler."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, InputError
from . import schedule as S
from .alpha_bar import AlphaBarScheduler


class LCM(AlphaBarScheduler):
    name = "lcm"
    diffusers_class = "LCMScheduler"
    DEFAULTS = dict(original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
                    timestep_scaling=10.0, rescale_betas_zero_snr=False)
    sigma_data = 0.5  # consistency-model boundary condition (Song et al. 2023, Appendix C)

    def __init__(self, config):
        super().__init__(config)
        if self.opt("original_inference_steps") > config.num_train_timesteps:
            raise ConfigError("lcm: original_inference_steps exceeds num_train_timesteps")

    def _refusal(self, n: int) -> str | None:
        original = int(self.opt("original_inference_steps"))
        if n > original:  # diffusers raises ValueError: the schedule below has only `original` timesteps to pick
            return f"exceed the {original} steps this model was distilled with (original_inference_steps)"
        return None

    def set_timesteps(self, n: int, *, mu=None, sigmas=None, strength: float = 1.0) -> None:
        """``strength`` < 1 (LatentConsistencyModelImg2ImgPipeline): the n timesteps are picked from the first
        ``int(original_inference_steps * strength)`` of the distillation schedule, the least noisy ones."""
        n = self._check_steps(n, mu, sigmas)
        original = int(self.opt("original_inference_steps"))
        kept = int(original * strength)
        if n > kept:  # diffusers raises ValueError (skipping step < 1): too few timesteps to pick n from
            raise InputError(f"lcm: {n} steps with strength {strength} exceed the {kept} timesteps of the distillation "
                             f"schedule that strength keeps ({original} x {strength}); lower the steps or raise strength")
        k = self.config.num_train_timesteps // original
        origin = np.asarray(list(range(1, kept + 1))) * k - 1  # the distillation's skipping-step schedule
        origin = origin[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.int64)
        self.num_inference_steps = n

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        t = int(self.timesteps[i])
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t, a_prev = self.alphas_cumprod[t], self._alpha(prev_t)
        # 1. boundary-condition scalings c_skip(t), c_out(t)
        st = t * self.opt("timestep_scaling")
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / (st**2 + self.sigma_data**2) ** 0.5
        # 2. predicted x0, then the consistency function's output
        x0, _ = S.to_x0_eps(model_output, sample, np.sqrt(a_t), np.sqrt(1 - a_t), self.config.prediction_type)
        if self.opt("clip_sample"):
            x0 = np.clip(x0, -self.opt("clip_sample_range"), self.opt("clip_sample_range"))
        denoised = c_out * x0 + c_skip * sample
        if i == self.num_inference_steps - 1:
            return denoised.astype(np.float32)
        # 3. re-noise to the next timestep (multistep consistency sampling)
        eps = self._noise(noise, model_output.shape)
        return (np.sqrt(a_prev) * denoised + np.sqrt(1 - a_prev) * eps).astype(np.float32)
