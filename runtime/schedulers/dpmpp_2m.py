"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data prediction, midpoint solver type, as
diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import _common as C
from ._base import SchedulerBase


def alpha_sigma(sigma):
    """VP (alpha_t, sigma_t) from the VE sigma = sigma_t / alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def lambda_of(sigma):
    """Half log-SNR lambda = log(alpha_t) - log(sigma_t); +inf at sigma = 0 (the final, noise-free step), as in
    diffusers, without numpy's divide-by-zero warning reaching the user."""
    a, s = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(a) - np.log(s)


def multistep_timesteps(c, n: int, spacing: str, offset: int) -> np.ndarray:
    """(n,) int64 timesteps as diffusers' multistep solvers (DPM-Solver, UniPC) pick them."""
    T = c.num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    return np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1


class MultistepBase(SchedulerBase):
    """Shared by DPM-Solver++ and UniPC: sigma schedule (optionally Karras), x0/eps conversion, add_noise."""

    DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False, final_sigmas_type="zero",
                    solver_order=2, lower_order_final=True, euler_at_final=False, rescale_betas_zero_snr=False)

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = C.alphas_cumprod(config, self.opt("rescale_betas_zero_snr"), sigma_space=True)
        self.solver_order = int(self.opt("solver_order"))
        self.sigmas = np.zeros((1,), np.float32)

    def _sigma_last(self, sigmas) -> float:
        raise NotImplementedError  # abstract: DPM and UniPC pick the last sigma differently

    def set_timesteps(self, n: int) -> None:
        ts = multistep_timesteps(self.config, n, self.opt("timestep_spacing"), self.opt("steps_offset"))
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).astype(np.float32)
        log_sigmas = np.log(train_sigmas)
        if self.opt("use_karras_sigmas"):
            flipped = np.flip(train_sigmas).copy()
            sigmas = C.karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            ts = np.array([C.sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.config.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = np.concatenate([sigmas, [self._sigma_last(sigmas)]]).astype(np.float32)  # (n + 1,)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset()

    def _reset(self) -> None:
        self.model_outputs: list = [None] * self.solver_order
        self.lower_order_nums = 0

    def _to_x0(self, model_output, sample, i):
        a, s = alpha_sigma(self.sigmas[i])
        return C.to_x0_eps(model_output, sample, a, s, self.config.prediction_type)

    def add_noise(self, original, noise, i):
        a, s = alpha_sigma(self.sigmas[i])
        return (a * original + s * noise).astype(np.float32)


class DPMSolverPP2M(MultistepBase):
    name = "dpmpp_2m"

    def __init__(self, config):
        super().__init__(config)
        if self.solver_order not in (1, 2):
            raise ConfigError(f"dpmpp_2m: solver_order={self.solver_order}; expected one of [1, 2]")
        if self.opt("solver_type") not in (None, "midpoint", "bh1", "bh2"):  # diffusers maps bh* to midpoint
            raise ConfigError(f"dpmpp_2m: solver_type={self.opt('solver_type')!r}; expected 'midpoint'")

    def _sigma_last(self, sigmas) -> float:
        if self.opt("final_sigmas_type") == "sigma_min":
            return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        return 0.0

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
        if self.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            # first order (DPM-Solver++ eq. 8 / DDIM): x_t = (s_t/s_s) x - a_t (e^-h - 1) x0
            out = (s_t / s_s0) * sample - (a_t * (np.exp(-h) - 1.0)) * x0
        else:
            # 2M multistep (Algorithm 2): D0 = m0, D1 = (m0 - m1) / r0, midpoint form
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            r0 = (lambda_of(self.sigmas[i]) - lambda_of(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - m1)
            out = (s_t / s_s0) * sample - (a_t * (np.exp(-h) - 1.0)) * m0 - 0.5 * (a_t * (np.exp(-h) - 1.0)) * d1
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        return out.astype(np.float32)


class DPMSolverPP2MKarras(DPMSolverPP2M):
    name = "dpmpp_2m_karras"

    def opt(self, key):
        return True if key == "use_karras_sigmas" else super().opt(key)
