"""What the flow-matching schedulers share (diffusers' FlowMatch*DiscreteScheduler): the kind, the training
schedule's sigma range, the checks of the pipeline's schedule inputs (mu, sigmas) and img2img's noising.

x_sigma = (1 - sigma) x0 + sigma noise (rectified flow; see flow_shift.py). No input scaling and unit initial noise:
the model is fed the latents as they are, and ``timesteps`` = sigma * num_train_timesteps (float32), the value
diffusers passes to SD3's transformer (FLUX's pipeline divides it by 1000 before its transformer)."""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from ..errors import ConfigError, InputError
from .base import SchedulerBase
from .flow_shift import static_shift


class FlowSchedulerBase(SchedulerBase):
    kind: ClassVar[str] = "flow"

    def __init__(self, config):
        super().__init__(config)
        if config.kind != "flow":  # make_scheduler refuses this first, naming the schedulers that fit
            raise ConfigError(f"{self.name} runs flow-matching models; this scheduler config is "
                              f"{config.class_name or 'not a FlowMatch one'}")
        self.sigmas = np.zeros((1,), np.float32)
        # diffusers' __init__: the training schedule sigma = t / T for t = T..1 (float32), shifted unless the shift is
        # dynamic; set_timesteps spaces the inference steps between its ends
        T = config.num_train_timesteps
        ends = np.array([T, 1], np.float32) / T  # (2,) float32: sigma at t = T and t = 1
        if not self._dynamic():
            ends = static_shift(ends, self.opt("shift"))
        self.sigma_max, self.sigma_min = float(ends[0]), float(ends[1])

    def _dynamic(self) -> bool:
        return bool(self.opt("use_dynamic_shifting"))

    def _check_schedule_inputs(self, n: int, mu, sigmas) -> np.ndarray | None:
        """``sigmas`` as a (n,) float32 array (None if not given), after checking mu and sigmas: one InputError line
        each, before any state changes. ``n`` has passed ``_check_steps``."""
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float, np.floating, np.integer))
                               or not math.isfinite(mu)):
            raise InputError(f"{self.name}: mu={mu!r}; expected a finite number (calculate_shift of the image's "
                             "token count)")
        if sigmas is None:
            return None
        try:
            s = np.asarray(sigmas, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{self.name}: sigmas must be a sequence of numbers") from None
        if s.ndim != 1 or len(s) != n:
            raise InputError(f"{self.name}: {s.size} sigmas for {n} steps; give one sigma per step (a 1-D list of "
                             f"{n} numbers)")
        if not (np.isfinite(s).all() and (s > 0).all() and (s <= 1).all()):
            raise InputError(f"{self.name}: sigmas must lie in (0, 1] (1 = pure noise); got {s.min():g} to {s.max():g}")
        # diffusers: np.array(sigmas).astype(np.float32), whatever the caller's dtype
        return np.asarray(sigmas).astype(np.float32)

    def add_noise(self, original, noise, i):
        """img2img's starting latents at step ``i``: diffusers' scale_noise, sigma noise + (1 - sigma) x0."""
        sigma = self.sigmas[i]
        return (sigma * noise + (1.0 - sigma) * original).astype(np.float32)
