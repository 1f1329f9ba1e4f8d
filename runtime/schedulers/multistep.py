"""The multistep-solver family (DPM-Solver++, UniPC): VP (alpha_t, sigma_t) from a sigma schedule (optionally
Karras), half log-SNR lambda_t, a history of model outputs, add_noise."""
from __future__ import annotations

import numpy as np

from . import schedule as S
from .base import SchedulerBase
from .spacing import spaced_timesteps


def alpha_sigma(sigma):
    """VP (alpha_t, sigma_t) from the VE sigma = sigma_t / alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def f32(fn, x) -> np.float32:
    """float32 ``fn(x)`` rounded once from float64, as torch's float32 exp/log/expm1 on a 0-d CPU tensor round it:
    numpy's float32 loops can be an ulp off, and at ~1000 steps the solvers divide such ulps by a step h of a few
    1e-3 (UniPC's B(h) coefficients by h^2), which put 1000-step UniPC 6e-4 away from diffusers (now 5e-6)."""
    return np.float32(fn(np.float64(x)))


def lambda_of(sigma):
    """Half log-SNR lambda = log(alpha_t) - log(sigma_t); +inf at sigma = 0 (the final, noise-free step), as in
    diffusers, without numpy's divide-by-zero warning reaching the user."""
    a, s = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return f32(np.log, a) - f32(np.log, s)


class MultistepBase(SchedulerBase):
    DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False, final_sigmas_type="zero",
                    solver_order=2, lower_order_final=True, euler_at_final=False, rescale_betas_zero_snr=False)

    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = S.alphas_cumprod(config, self.opt("rescale_betas_zero_snr"), sigma_space=True)
        self.solver_order = int(self.opt("solver_order"))
        self.sigmas = np.zeros((1,), np.float32)

    def _spaced(self, n: int) -> np.ndarray:
        """(n,) int64 timesteps, descending, as diffusers' multistep solvers space them."""
        ts = spaced_timesteps(self.config.num_train_timesteps, n, self.opt("timestep_spacing"), self.opt("steps_offset"),
                              extra=1)
        return ts.astype(np.int64)

    def _refusal(self, n: int) -> str | None:
        # The solvers divide by the log-SNR step h = lambda_{i+1} - lambda_i; two steps at one noise level make it 0
        # and the next step NaN (diffusers too). Without Karras sigmas that happens when two timesteps coincide:
        # "linspace" rounding at n = T; "leading" at the top counts, where T // (n + 1) is 0 or steps_offset pushes a
        # timestep past T - 1 onto the last sigma. Karras sigmas are distinct at any count. Sigma grows strictly
        # with t, so equal (clipped) timesteps are exactly the equal sigmas.
        if self.opt("use_karras_sigmas"):
            return None
        ts = np.clip(self._spaced(n), 0, self.config.num_train_timesteps - 1)
        same = np.flatnonzero(ts[1:] == ts[:-1])
        if len(same):
            return (f"{self._spacing_text()} put two steps at timestep {int(ts[same[0]])}: a zero log-SNR step, "
                    "which the solver divides by")
        return None

    def _sigma_last(self, sigmas) -> float:
        """The sigma the last step lands on: 0 (noise-free), or the training schedule's smallest."""
        if self.opt("final_sigmas_type") == "sigma_min":
            return float(S.train_sigmas(self.alphas_cumprod[:1])[0])
        return 0.0

    def set_timesteps(self, n: int, *, mu=None, sigmas=None) -> None:
        n = self._check_steps(n, mu, sigmas)
        ts = self._spaced(n)
        train_sigmas = S.train_sigmas(self.alphas_cumprod)  # (T,)
        if self.opt("use_karras_sigmas"):
            flipped = np.flip(train_sigmas).copy()
            sigmas = S.karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            log_sigmas = np.log(train_sigmas)
            ts = np.array([S.sigma_to_t(s, log_sigmas) for s in sigmas])
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
        return S.to_x0_eps(model_output, sample, a, s, self.config.prediction_type)

    def add_noise(self, original, noise, i):
        a, s = alpha_sigma(self.sigmas[i])
        return (a * original + s * noise).astype(np.float32)
