"""UniPC (Zhao et al. 2023): the UniP predictor with the UniC corrector, B(h) = e^h - 1 ("bh2") by default, data
prediction, as diffusers' UniPCMultistepScheduler."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .multistep import MultistepBase, alpha_sigma, f32, lambda_of


class UniPC(MultistepBase):
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    DEFAULTS = dict(MultistepBase.DEFAULTS, solver_type="bh2", predict_x0=True, disable_corrector=())

    def __init__(self, config):
        super().__init__(config)
        if self.opt("solver_type") not in ("bh1", "bh2", "midpoint"):
            raise ConfigError(f"unipc: solver_type={self.opt('solver_type')!r}; expected one of ['bh1', 'bh2']")
        self.predict_x0 = bool(self.opt("predict_x0"))
        self.bh = "bh1" if self.opt("solver_type") == "bh1" else "bh2"  # diffusers maps midpoint/heun to bh2

    def _sigma_last(self, sigmas) -> float:
        if self.opt("final_sigmas_type") == "sigma_min" and self.opt("use_karras_sigmas"):
            return float(sigmas[-1])  # diffusers' UniPC ends on the Karras ramp's own smallest sigma
        return super()._sigma_last(sigmas)

    def _reset(self) -> None:
        super()._reset()
        self.last_sample = None
        self.this_order = 0

    def _convert(self, model_output, sample, i):
        x0, eps = self._to_x0(model_output, sample, i)
        return x0 if self.predict_x0 else eps

    def _coefficients(self, h, rks: list, order: int):
        """The B(h)-weighted linear system of UniPC Theorem 3.1: R (order x order) and b (order,)."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = f32(np.expm1, hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if self.bh == "bh1" else h_phi_1
        rks = np.array(rks + [1.0], dtype=np.float32)
        R, b, fact = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return np.stack(R).astype(np.float32), np.array(b, dtype=np.float32), h_phi_1, B_h

    def step(self, model_output, i, sample, noise=None):
        self._check_ready(i)
        n = len(self.timesteps)
        use_corrector = i > 0 and (i - 1) not in self.opt("disable_corrector") and self.last_sample is not None
        m_t = self._convert(model_output, sample, i)
        if use_corrector:  # UniC: refine x_t with the model output just computed at it
            sample = self._corrector(m_t, self.last_sample, sample, i, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [m_t]
        order = min(self.solver_order, n - i) if self.opt("lower_order_final") else self.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up of the multistep history
        self.last_sample = sample
        out = self._predictor(sample, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        return out

    def _predictor(self, x, i, order):
        """UniP-p (Algorithm 2): x_{t} from x_{s0} and the last ``order`` model outputs."""
        m0 = self.model_outputs[-1]
        a_t, s_t = alpha_sigma(self.sigmas[i + 1])
        a_s0, s_s0 = alpha_sigma(self.sigmas[i])
        lam_s0 = lambda_of(self.sigmas[i])
        h = lambda_of(self.sigmas[i + 1]) - lam_s0
        rks, D1s = [], []
        for k in range(1, order):
            rk = (lambda_of(self.sigmas[i - k]) - lam_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._coefficients(h, rks, order)
        if self.predict_x0:
            x_t = s_t / s_s0 * x - a_t * h_phi_1 * m0
        else:
            x_t = a_t / a_s0 * x - s_t * h_phi_1 * m0
        if D1s:  # only then: at the zero-SNR last step B(h) is infinite and 0 * inf would be NaN
            rhos = np.array([0.5], np.float32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).astype(np.float32)
            res = sum(r * d for r, d in zip(rhos, D1s))
            x_t = x_t - (a_t if self.predict_x0 else s_t) * B_h * res
        return np.asarray(x_t, dtype=np.float32)

    def _corrector(self, m_t, x, x_t, i, order):
        """UniC (Algorithm 1): correct x_t using the new model output m_t at t."""
        m0 = self.model_outputs[-1]
        a_t, s_t = alpha_sigma(self.sigmas[i])
        a_s0, s_s0 = alpha_sigma(self.sigmas[i - 1])
        lam_s0 = lambda_of(self.sigmas[i - 1])
        h = lambda_of(self.sigmas[i]) - lam_s0
        rks, D1s = [], []
        for k in range(1, order):
            rk = (lambda_of(self.sigmas[i - (k + 1)]) - lam_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)
        R, b, h_phi_1, B_h = self._coefficients(h, rks, order)
        rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(R, b).astype(np.float32)
        res = sum(r * d for r, d in zip(rhos[:-1], D1s)) if D1s else 0.0
        d1_t = m_t - m0
        if self.predict_x0:
            out = s_t / s_s0 * x - a_t * h_phi_1 * m0 - a_t * B_h * (res + rhos[-1] * d1_t)
        else:
            out = a_t / a_s0 * x - s_t * h_phi_1 * m0 - s_t * B_h * (res + rhos[-1] * d1_t)
        return np.asarray(out, dtype=np.float32)
