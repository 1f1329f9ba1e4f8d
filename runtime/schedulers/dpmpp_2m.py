"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, midpoint solver type, as
diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .multistep import MultistepBase, alpha_sigma, f32, lambda_of


class DPMSolverPP2M(MultistepBase):
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"

    def __init__(self, config):
        super().__init__(config)
        if self.solver_order not in (1, 2):
            raise ConfigError(f"{self.name}: solver_order={self.solver_order}; expected one of [1, 2]")
        if self.opt("solver_type") not in (None, "midpoint", "bh1", "bh2"):  # diffusers maps bh* to midpoint
            raise ConfigError(f"{self.name}: solver_type={self.opt('solver_type')!r}; expected 'midpoint'")

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        n = len(self.timesteps)
        lower_final = i == n - 1 and (self.opt("euler_at_final") or (self.opt("lower_order_final") and n < 15)
                                      or self.opt("final_sigmas_type") == "zero")
        x0, _ = self._to_x0(model_output, sample, i)  # DPM-Solver++ works on data predictions
        self.model_outputs = self.model_outputs[1:] + [x0]
        a_t, s_t = alpha_sigma(self.sigmas[i + 1])
        _, s_s0 = alpha_sigma(self.sigmas[i])
        h = lambda_of(self.sigmas[i + 1]) - lambda_of(self.sigmas[i])
        phi = a_t * (f32(np.exp, -h) - 1.0)  # alpha_t (e^{-h} - 1)
        if self.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            # first order (DPM-Solver++ eq. 8 / DDIM): x_t = (s_t/s_s) x - a_t (e^-h - 1) x0
            out = (s_t / s_s0) * sample - phi * x0
        else:
            # 2M multistep (Algorithm 2): D0 = m0, D1 = (m0 - m1) / r0, midpoint form
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            r0 = (lambda_of(self.sigmas[i]) - lambda_of(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - m1)
            out = (s_t / s_s0) * sample - phi * m0 - 0.5 * phi * d1
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        return out.astype(np.float32)


class DPMSolverPP2MKarras(DPMSolverPP2M):
    """DPM++ 2M with Karras et al. 2022 sigmas, whatever the bundle's config says (A1111's "DPM++ 2M Karras")."""

    name = "dpmpp_2m_karras"
    OVERRIDES = dict(use_karras_sigmas=True)
