"""Noise-schedule math shared by the schedulers (DDPM, Ho et al. 2020; Karras et al. 2022; Lin et al. 2023).
float32 where diffusers computes in float32, so that results agree to rounding."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from .config import SchedulerConfig


def betas(c: SchedulerConfig) -> np.ndarray:
    """(T,) float32 beta_t."""
    T = c.num_train_timesteps
    if c.trained_betas is not None:
        b = np.asarray(c.trained_betas, dtype=np.float32)
        if b.shape != (T,):
            raise ConfigError(f"trained_betas has {b.size} values; num_train_timesteps is {T}")
    elif c.beta_schedule == "linear":
        b = linspace_f32(c.beta_start, c.beta_end, T)
    elif c.beta_schedule == "scaled_linear":  # SD's schedule: linear in sqrt(beta)
        b = linspace_f32(c.beta_start**0.5, c.beta_end**0.5, T) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021 eq. (17), beta capped at 0.999
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float32)
    return b


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit: float32 step, each half computed from its own end
    point with one fused multiply-add (exact in float64, then rounded once)."""
    s, e = np.float32(start), np.float32(end)
    step = (e - s) / np.float32(n - 1)
    idx = np.arange(n)
    k = np.where(idx < n // 2, idx, n - 1 - idx).astype(np.float64)
    lo = (np.float64(s) + np.float64(step) * k).astype(np.float32)
    hi = (np.float64(e) - np.float64(step) * k).astype(np.float32)
    return np.where(idx < n // 2, lo, hi)


def alphas_cumprod(c: SchedulerConfig, rescale_zero_snr: bool = False, *, sigma_space: bool = False) -> np.ndarray:
    """(T,) float32 alpha_bar_t = prod_{s<=t} (1 - beta_s). Sigma-space schedulers (Euler, DPM, UniPC) floor the
    zero-SNR alpha_bar at 2^-24 so that sigma stays finite, as diffusers does; DDIM-style ones keep the 0."""
    b = betas(c)
    if rescale_zero_snr:
        b = zero_terminal_snr(b)
    a = np.cumprod((1.0 - b).astype(np.float64)).astype(np.float32)  # torch accumulates float32 products in double
    if rescale_zero_snr and sigma_space:
        a[-1] = 2**-24
    return a


def zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last timestep has SNR 0."""
    s = np.sqrt(np.cumprod((1.0 - b).astype(np.float64)).astype(np.float32))
    s0, sT = s[0].copy(), s[-1].copy()
    s = (s - sT) * (s0 / (s0 - sT))
    a = s**2
    a = np.concatenate([a[:1], a[1:] / a[:-1]])
    return (1 - a).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """(T,) float32 VE noise level per training timestep: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. (5): sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep of each sigma by linear interpolation in log-sigma (as k-diffusion does)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def to_x0_eps(model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t, prediction_type: str):
    """(x0, eps) from the model output, with x_t = alpha_t x0 + sigma_t eps (VP parameterisation)."""
    if prediction_type == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
        return x0, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t * model_output) / sigma_t
    # v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, with alpha^2 + sigma^2 = 1)
    x0 = alpha_t * sample - sigma_t * model_output
    eps = alpha_t * model_output + sigma_t * sample
    return x0, eps
