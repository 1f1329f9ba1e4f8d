"""The noise levels of flow-matching models, as diffusers' FlowMatch*DiscreteScheduler compute them.

Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers",
SD3) interpolates data and noise on a straight line, x_sigma = (1 - sigma) x0 + sigma noise, sigma from 1 (noise)
to 0 (data); the transformer predicts the velocity v = noise - x0, so dx/dsigma = v. Inference runs n sigmas evenly
spaced in t = sigma, then shifted towards the noise end, where high-resolution images need more steps:

- static shift s (Esser et al. 2024, section 5.3.2, eq. 23): sigma' = s sigma / (1 + (s - 1) sigma). SD3: s = 3.
- dynamic shift by mu (FLUX): exponential sigma' = e^mu / (e^mu + (1/sigma - 1)) — eq. 23 with s = e^mu — or linear
  sigma' = mu / (mu + (1/sigma - 1)); mu grows linearly with the image's token count (``calculate_shift``).

Each function keeps the dtype of its input the way diffusers' numpy/torch code does (float64 for the default
linspace, float32 for sigmas a pipeline passes), so that the schedules agree to the bit or to float32 rounding.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

# diffusers' FlowMatchEulerDiscreteScheduler defaults; its config always carries them (register_to_config fills them
# in), so the pipelines' own fallbacks (SD3 writes max_shift 1.16) never apply to it
BASE_IMAGE_SEQ_LEN, MAX_IMAGE_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def calculate_shift(image_seq_len: int, base_seq_len: int = BASE_IMAGE_SEQ_LEN, max_seq_len: int = MAX_IMAGE_SEQ_LEN,
                    base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """FLUX's resolution-dependent mu (diffusers' pipelines' ``calculate_shift``): linear in the number of image
    tokens, base_shift at base_seq_len tokens and max_shift at max_seq_len. ``image_seq_len`` is the transformer's
    image sequence length: (latent height / 2) * (latent width / 2) for FLUX's packed 2x2 patches and SD3's
    patch_size 2 — 1024 tokens at 512x512, 4096 at 1024x1024."""
    if max_seq_len == base_seq_len:
        raise ConfigError(f"scheduler config: base_image_seq_len and max_image_seq_len are both {base_seq_len}; "
                          "mu is interpolated between them, so they must differ")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def mu_for(config, image_seq_len: int) -> float:
    """``calculate_shift`` with the scheduler config's base/max values (diffusers' defaults where the file omits
    them), as FluxPipeline and StableDiffusion3Pipeline call it. ``config``: a SchedulerConfig."""
    def get(key, default):
        v = getattr(config, key)
        return default if v is None else v

    return calculate_shift(image_seq_len, get("base_image_seq_len", BASE_IMAGE_SEQ_LEN),
                           get("max_image_seq_len", MAX_IMAGE_SEQ_LEN), get("base_shift", BASE_SHIFT),
                           get("max_shift", MAX_SHIFT))


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """(n,) float64: the sigmas FluxPipeline passes to set_timesteps, np.linspace(1, 1/n, n) — the default
    schedule's linspace ends at 1/T instead."""
    n = num_inference_steps
    return np.linspace(1.0, 1 / n, n)


def static_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Esser et al. 2024, eq. 23: sigma' = s sigma / (1 + (s - 1) sigma), in the dtype of ``sigmas``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str) -> np.ndarray:
    """The dynamic shift by mu. diffusers writes (1/t - 1) ** sigma with sigma = 1.0, which is the identity."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Scale 1 - sigma so that the last sigma is ``shift_terminal`` (LTX-Video's rf.py, as diffusers'
    stretch_shift_to_terminal)."""
    one_minus_z = 1 - sigmas
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """(n,) float64 sigmas evenly spaced in log sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
