"""Heun's method (the explicit trapezoidal rule, Karras et al. 2022 Algorithm 1 without churn) on the rectified-flow
ODE, as diffusers' FlowMatchHeunDiscreteScheduler: second order, two model calls per step but the last.

Its schedule is FlowMatchEuler's with a static ``shift`` only (no mu, no pipeline sigmas, no Karras/terminal
options: diffusers' class has none; its FluxPipeline run fails on the sigmas FLUX passes, so use flow_euler there).
The model calls are laid out as diffusers lays them, one ``timesteps`` entry per call, so the one denoising loop
runs them unchanged: for n steps, 2n - 1 entries

    timesteps: t_0, t_1, t_1, t_2, t_2, ..., t_{n-1}, t_{n-1}
    index:     0    1    2    3    4          2n-3     2n-2

Even indices are Euler predictor steps from sigma_k to sigma_{k+1} (the last one, to sigma 0, stays first order);
each odd index evaluates the model at the predicted point and corrects with the mean of the two slopes. ``order`` is
2, so img2img's begin index (skipped steps * order) lands on a predictor step.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import ConfigError, EdgediffError
from .flow_base import FlowSchedulerBase
from .flow_shift import static_shift

# FlowMatchEuler options this class does not have, at the values where leaving them out changes nothing
_EULER_ONLY = dict(invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                   stochastic_sampling=False)


class FlowMatchHeun(FlowSchedulerBase):
    name = "flow_heun"
    diffusers_class = "FlowMatchHeunDiscreteScheduler"
    DEFAULTS = dict(shift=1.0)
    order = 2

    def __init__(self, config):
        if config.use_dynamic_shifting:
            # diffusers' pipelines then pass mu, which FlowMatchHeunDiscreteScheduler.set_timesteps does not take
            raise ConfigError(f"{self.name}: this model's scheduler shifts by resolution (use_dynamic_shifting=true), "
                              "which FlowMatchHeunDiscreteScheduler cannot do; use flow_euler")
        super().__init__(config)
        dropped = {k: getattr(config, k) for k, v in _EULER_ONLY.items() if getattr(config, k) not in (None, v, 0.0)}
        if dropped:  # diffusers' from_config ignores them too (with a log line): same result, said once
            warnings.warn(f"{self.name}: ignoring {', '.join(f'{k}={v!r}' for k, v in dropped.items())} "
                          "(FlowMatchHeunDiscreteScheduler has no such option, so neither does flow_heun)", stacklevel=3)
        self._first = None  # (index, derivative, dt, sample) of the predictor step awaiting its corrector

    def _dynamic(self) -> bool:
        return False

    def set_timesteps(self, n: int, *, mu: float | None = None, sigmas=None) -> None:
        n = self._check_steps(n, mu, sigmas)
        T = self.config.num_train_timesteps
        s = static_shift(np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T, self.opt("shift"))
        s = s.astype(np.float32)  # (n,)
        t = s * np.float32(T)
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(np.float32)  # (2n - 1,)
        s = np.concatenate([s, np.zeros((1,), np.float32)])
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])  # (2n,) float32: sigma per entry, then 0
        self.num_inference_steps = n
        self._first = None

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        sample = sample.astype(np.float32)  # diffusers upcasts before the update
        if i % 2 == 0:  # predictor: an Euler step from sigmas[i] to sigmas[i + 1]
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            # diffusers' operations in its order (x0 first, then the slope), so rounding agrees
            denoised = sample - model_output * sigma
            derivative = (sample - denoised) / sigma
            dt = sigma_next - sigma
            self._first = (i, derivative, dt, sample)
            return (sample + derivative * dt).astype(np.float32)
        if self._first is None or self._first[0] != i - 1:
            raise EdgediffError(f"{self.name}: step {i} corrects the predictor step {i - 1}, which did not run just "
                                "before it (begin at an even index)")
        _, first_derivative, dt, first_sample = self._first
        self._first = None
        # corrector: the slope at the predicted point (sigma_{k+1}), averaged with the predictor's (trapezoidal rule)
        sigma_next = self.sigmas[i]
        denoised = sample - model_output * sigma_next
        derivative = (sample - denoised) / sigma_next
        derivative = 0.5 * (first_derivative + derivative)
        return (first_sample + derivative * dt).astype(np.float32)
