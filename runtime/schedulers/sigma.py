"""The k-diffusion family (Euler, Euler ancestral): x_t = x0 + sigma_t eps in VE sigma space (Karras et al. 2022);
the model is fed x / sqrt(sigma^2 + 1), as diffusers' Euler*DiscreteScheduler do."""
from __future__ import annotations

import numpy as np

from . import schedule as S
from .base import SchedulerBase
from .spacing import spaced_timesteps


class SigmaScheduler(SchedulerBase):
    DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False, final_sigmas_type="zero",
                    rescale_betas_zero_snr=False)
    karras_allowed = True  # False: ignores use_karras_sigmas / final_sigmas_type, as its diffusers twin has neither

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = S.alphas_cumprod(config, self.opt("rescale_betas_zero_snr"), sigma_space=True)
        self.sigmas = np.zeros((1,), np.float32)

    def set_timesteps(self, n: int, *, mu=None, sigmas=None) -> None:
        # Any count from 1 to T runs: a "leading" timestep past T - 1 reads the last sigma, as in diffusers.
        n = self._check_steps(n, mu, sigmas)
        self.num_inference_steps = n
        spacing = self.opt("timestep_spacing")
        ts = spaced_timesteps(self.config.num_train_timesteps, n, spacing, self.opt("steps_offset"), integer=False)
        ts = ts.astype(np.float32)  # (n,) continuous timesteps, as diffusers keeps them
        train_sigmas = S.train_sigmas(self.alphas_cumprod)  # (T,)
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.karras_allowed and self.opt("use_karras_sigmas"):
            sigmas = S.karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            log_sigmas = np.log(train_sigmas)
            ts = np.array([S.sigma_to_t(s, log_sigmas) for s in sigmas])
        last = 0.0
        if self.karras_allowed and self.opt("final_sigmas_type") == "sigma_min":
            last = train_sigmas[0]
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = ts.astype(np.float32)
        max_sigma = self.sigmas.max()
        self.init_noise_sigma = float(max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5)

    def scale_model_input(self, sample, i):
        sigma = self.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def _x0(self, model_output, sample, sigma):
        p = self.config.prediction_type
        if p == "epsilon":
            return sample - sigma * model_output
        if p == "v_prediction":  # v in sigma space: x0 = -sigma/sqrt(s^2+1) v + x/(s^2+1)
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output

    def add_noise(self, original, noise, i):
        return (original + noise * self.sigmas[i]).astype(np.float32)
