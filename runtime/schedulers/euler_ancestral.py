"""Euler ancestral sampling (k-diffusion's sample_euler_ancestral), as diffusers' EulerAncestralDiscreteScheduler:
an Euler step down to sigma_down, then fresh noise of scale sigma_up."""
from __future__ import annotations

import numpy as np

from .sigma import SigmaScheduler


class EulerAncestral(SigmaScheduler):
    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    karras_allowed = False  # diffusers' EulerAncestral has no Karras sigmas and always ends at sigma 0

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(model_output, sample, sigma)
        # split the move to sigma_to into a deterministic part (to sigma_down) and injected noise (sigma_up)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        eps = self._noise(noise, model_output.shape)
        return (prev + eps * sigma_up).astype(np.float32)
