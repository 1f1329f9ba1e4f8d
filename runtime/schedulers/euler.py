"""Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 2 with no churn), as
diffusers' EulerDiscreteScheduler."""
from __future__ import annotations

import numpy as np

from .sigma import SigmaScheduler


class Euler(SigmaScheduler):
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample, sigma)
        # Karras et al. 2022, Algorithm 2, lines 5-8 with gamma = 0: d = (x - x0) / sigma; x' = x + d (sigma' - sigma)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (self.sigmas[i + 1] - sigma)).astype(np.float32)
