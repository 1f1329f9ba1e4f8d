"""Euler's method on the rectified-flow ODE dx/dsigma = v, as diffusers' FlowMatchEulerDiscreteScheduler (SD3,
SD3.5, FLUX.1): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i (Liu et al. 2022; Esser et al. 2024, section 2).

The schedule (flow_shift.py): n sigmas from the training schedule's ends (or the pipeline's ``sigmas``), shifted by
the config's ``shift`` or — with ``use_dynamic_shifting`` — by the pipeline's ``mu``, optionally stretched to
``shift_terminal`` and respaced as Karras or exponential sigmas, then 0 appended (1 with ``invert_sigmas``).

How the pipeline calls it (the one Scheduler protocol; the keywords are the ones diffusers' pipelines pass):

    sched = make_scheduler("flow_euler", config)  # config._class_name FlowMatchEulerDiscreteScheduler
    mu = mu_for(config, image_seq_len)            # flow_shift.py; FLUX always passes it, SD3 when use_dynamic_shifting
    sched.set_timesteps(n, mu=mu, sigmas=flux_sigmas(n))   # FLUX; SD3: set_timesteps(n) (+ mu= if dynamic)
    # timesteps[i] = sigma_i * 1000: SD3's transformer takes it as is, FLUX's pipeline feeds timesteps[i] / 1000

``mu`` is ignored unless ``use_dynamic_shifting`` (FluxPipeline passes it to schnell too) and required with it.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgediffError, InputError
from . import schedule as S
from .flow_base import FlowSchedulerBase
from .flow_shift import exponential_sigmas, static_shift, stretch_to_terminal, time_shift


class FlowMatchEuler(FlowSchedulerBase):
    name = "flow_euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    schedule_inputs = ("mu", "sigmas")
    DEFAULTS = dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                    use_exponential_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)

    def set_timesteps(self, n: int, *, mu: float | None = None, sigmas=None) -> None:
        n = self._check_steps(n, mu, sigmas)
        given = self._check_schedule_inputs(n, mu, sigmas)
        if self._dynamic() and mu is None:  # a pipeline bug, not the user's input: diffusers raises ValueError
            raise EdgediffError(f"{self.name}: this scheduler config has use_dynamic_shifting=true, so set_timesteps "
                                "needs mu= (flow_shift.mu_for(config, image_seq_len))")
        T = self.config.num_train_timesteps
        if given is None:  # float64, as diffusers' np.linspace of python floats
            s = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T
        else:
            s = given  # float32
        if self._dynamic():
            s = time_shift(float(mu), s, self.opt("time_shift_type"))
        else:
            s = static_shift(s, self.opt("shift"))
        if self.opt("shift_terminal"):  # 0 or None: off, as diffusers' truthiness test
            if float(s[-1]) == 1.0:  # one step at sigma 1: 1 - sigma is 0 and the stretch 0/0 (diffusers: NaN)
                raise InputError(f"{self.name}: a schedule that ends at sigma 1 ({n} step{'s' * (n > 1)}) cannot be "
                                 f"stretched to shift_terminal={self.opt('shift_terminal')}; run 2 steps or more")
            s = stretch_to_terminal(s, self.opt("shift_terminal"))
        if self.opt("use_karras_sigmas"):  # Karras et al. 2022 eq. (5) between the shifted ends
            s = S.karras_sigmas(float(s[-1]), float(s[0]), n)
        elif self.opt("use_exponential_sigmas"):
            s = exponential_sigmas(float(s[-1]), float(s[0]), n)
        s = s.astype(np.float32)  # (n,)
        if self.opt("invert_sigmas"):
            s = np.float32(1.0) - s
        self.timesteps = (s * np.float32(T)).astype(np.float32)  # (n,) float32
        last = 1.0 if self.opt("invert_sigmas") else 0.0
        self.sigmas = np.concatenate([s, np.array([last], np.float32)])  # (n + 1,) float32
        self.num_inference_steps = n

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        sample = sample.astype(np.float32)  # diffusers upcasts before the update
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.opt("stochastic_sampling"):
            # re-noise: predicted x0 = x - sigma v, then the forward process to sigma_next with fresh noise
            x0 = sample - sigma * model_output
            eps = self._noise(noise, sample.shape)
            return ((1.0 - sigma_next) * x0 + sigma_next * eps).astype(np.float32)
        return (sample + (sigma_next - sigma) * model_output).astype(np.float32)
