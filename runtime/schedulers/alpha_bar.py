"""The DDPM-discrete family (DDIM, PNDM, LCM): alpha_bar indexed by integer training timestep,
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
from __future__ import annotations

import numpy as np

from . import schedule as S
from .base import SchedulerBase
from .spacing import spaced_timesteps


class AlphaBarScheduler(SchedulerBase):
    def __init__(self, config):
        super().__init__(config)
        self.alphas_cumprod = S.alphas_cumprod(config, bool(self.opt("rescale_betas_zero_snr")))  # (T,) float32
        # alpha_bar "before" the first training timestep, where the last step lands
        self.final_alpha_cumprod = np.float32(1.0) if self.opt("set_alpha_to_one") else self.alphas_cumprod[0]

    def _alpha(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _spaced(self, n: int) -> np.ndarray:
        """(n,) int64 timesteps, descending, by the config's timestep_spacing."""
        ts = spaced_timesteps(self.config.num_train_timesteps, n, self.opt("timestep_spacing"), self.opt("steps_offset"))
        return ts.astype(np.int64)

    def _refusal(self, n: int) -> str | None:
        # "leading" plus steps_offset can pass the last training timestep (1000 steps with SD's offset 1): there is no
        # alpha_bar to read, and diffusers raises IndexError
        top, last = int(self._spaced(n)[0]), self.config.num_train_timesteps - 1
        if top > last:
            return f"{self._spacing_text()} reach timestep {top}, past the model's last ({last})"
        return None

    def add_noise(self, original, noise, i):
        a = self.alphas_cumprod[int(self.timesteps[i])]
        return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32)
