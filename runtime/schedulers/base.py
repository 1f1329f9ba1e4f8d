"""State every scheduler has: its config, timesteps, begin index. Subclasses implement the math."""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import EdgediffError
from .config import SchedulerConfig


class SchedulerBase:
    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # diffusers' constructor defaults for keys the config may omit
    order: int = 1

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.timesteps = np.zeros((0,), np.int64)
        self.init_noise_sigma = 1.0
        self.begin_index = 0
        self.num_inference_steps = 0

    def opt(self, key: str) -> Any:
        """The effective value of config ``key``: the file's, else this scheduler's diffusers default."""
        return self.config.get(key, self.DEFAULTS)

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = int(begin_index)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def _check_ready(self, i: int) -> None:
        if not 0 <= i < len(self.timesteps):
            raise EdgediffError(f"{self.name}: step index {i} outside [0, {len(self.timesteps)}); call set_timesteps first")
