"""Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2 with no churn), as
diffusers' EulerDiscreteScheduler."""
from __future__ import annotations

import numpy as np

from . import _common as C
from ._base import SchedulerBase


def karras_space_timesteps(c, n: int, spacing: str, offset: int) -> np.ndarray:
    """(n,) float32 timesteps as the k-diffusion-style schedulers pick them."""
    T = c.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + offset
    return np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1


class SigmaScheduler(SchedulerBase):
    """x_t = x0 + sigma_t eps parameterisation; the model is fed x / sqrt(sigma^2 + 1)."""

    DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False, final_sigmas_type="zero",
                    rescale_betas_zero_snr=False)
    karras_allowed = True

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = C.alphas_cumprod(config, self.opt("rescale_betas_zero_snr"), sigma_space=True)
        self.sigmas = np.zeros((1,), np.float32)

    def set_timesteps(self, n: int) -> None:
        self.num_inference_steps = n
        ts = karras_space_timesteps(self.config, n, self.opt("timestep_spacing"), self.opt("steps_offset"))
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)  # (T,)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.karras_allowed and self.opt("use_karras_sigmas"):
            sigmas = C.karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
            ts = np.array([C.sigma_to_t(s, log_sigmas) for s in sigmas])
        last = 0.0
        if self.karras_allowed and self.opt("final_sigmas_type") == "sigma_min":
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # (n + 1,)
        self.timesteps = ts.astype(np.float32)
        max_sigma = self.sigmas.max()
        spacing = self.opt("timestep_spacing")
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


class Euler(SigmaScheduler):
    name = "euler"

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample, sigma)
        # Karras et al. 2022, Algorithm 2, lines 5-8 with gamma = 0: d = (x - x0) / sigma; x' = x + d (sigma' - sigma)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).astype(np.float32)
