"""What every scheduler shares: its config and the options it reads, the step-count check, timesteps, begin index,
noise draws. Families (alpha_bar, sigma, multistep) add their noise schedule; each scheduler adds its step."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import EdgediffError, InputError
from .config import SchedulerConfig


class SchedulerBase:
    name: ClassVar[str]  # registry name
    diffusers_class: ClassVar[str]  # the diffusers scheduler this one reproduces step by step
    DEFAULTS: ClassVar[Mapping[str, Any]] = {}  # diffusers' constructor defaults for keys the config may omit
    # config values this registry entry fixes whatever the file says; its diffusers equivalent is built with them too
    OVERRIDES: ClassVar[Mapping[str, Any]] = {}
    kind: ClassVar[str] = "diffusion"  # the model schedules it runs: "diffusion" (DDPM betas) or "flow" (rectified flow)
    schedule_inputs: ClassVar[tuple[str, ...]] = ()  # which of set_timesteps' keywords (mu, sigmas) it takes
    order: int = 1

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.timesteps = np.zeros((0,), np.int64)
        self.init_noise_sigma = 1.0
        self.begin_index = 0
        self.num_inference_steps = 0

    def opt(self, key: str) -> Any:
        """The effective value of config ``key``: this entry's override, else the file's, else the diffusers default."""
        if key in self.OVERRIDES:
            return self.OVERRIDES[key]
        return self.config.get(key, self.DEFAULTS)

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = int(begin_index)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def _check_steps(self, n, mu=None, sigmas=None) -> int:
        """``n`` as an int, or InputError naming the most steps this scheduler and config can run; InputError too for
        a schedule input (``mu``, ``sigmas``) this scheduler does not take. Called first by every ``set_timesteps``,
        so a refused count changes no state."""
        given = [k for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None and k not in self.schedule_inputs]
        if given:
            raise InputError(f"{self.name} takes no {' or '.join(given)} (diffusers' {self.diffusers_class} has none); "
                             "flow_euler takes both, for flow-matching models")
        T = self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise InputError(f"{self.name}: num_inference_steps={n!r}; expected an integer from 1 to {T} "
                             "(the model's training timesteps)")
        n = int(n)
        reason = self._refusal(n)
        if reason is not None:
            most = next((m for m in range(T, 0, -1) if self._refusal(m) is None), 0)
            raise InputError(f"{self.name}: {n} steps {reason}; it runs at most {most} steps with this scheduler config "
                             "(or pick another scheduler)")
        return n

    def _refusal(self, n: int) -> str | None:
        """Why ``n`` steps cannot run (diffusers fails there too), or None: any count from 1 to T works."""
        return None

    def _spacing_text(self) -> str:
        """The config's timestep spacing in words, for messages."""
        spacing = self.opt("timestep_spacing")
        offset = f" and steps_offset={self.opt('steps_offset')}" if spacing == "leading" else ""
        return f"with timestep_spacing={spacing!r}{offset}"

    def _check_ready(self, i: int) -> None:
        if not 0 <= i < len(self.timesteps):
            raise EdgediffError(f"{self.name}: step index {i} outside [0, {len(self.timesteps)}); call set_timesteps first")

    def _noise(self, noise, shape) -> np.ndarray:
        """Fresh standard-normal noise for a stochastic step, from the caller's source."""
        if noise is None:
            raise EdgediffError(f"scheduler {self.name!r} is stochastic and needs a noise source")
        return noise.standard_normal(shape)
