"""The one scheduler protocol. The denoising loop talks to every scheduler through it, indexed by step.

    sched = make_scheduler("euler", config)      # config: SchedulerConfig read from scheduler_config.json
    sched.set_timesteps(num_inference_steps)     # InputError, before any state changes, for a count it cannot run
    x = x * sched.init_noise_sigma
    for i in range(sched.begin_index, len(sched.timesteps)):
        eps = unet(sched.scale_model_input(x, i), sched.timesteps[i])
        x = sched.step(eps, i, x, noise)

A scheduler instance holds the state of one generation (multistep history): make one per call, never share it
between threads. The implementations share their code through ``base.SchedulerBase``.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..noise import NoiseSource


class Scheduler(Protocol):
    name: str  # registry name: "pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "unipc"
    timesteps: np.ndarray  # (N,) the model's timestep input per step, as diffusers feeds it to the UNet
    init_noise_sigma: float  # initial latents = standard normal * init_noise_sigma
    order: int  # diffusers' order: img2img skips `t_start * order` entries
    begin_index: int  # first index to run (0, or set by set_begin_index for img2img)

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def set_begin_index(self, begin_index: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: NoiseSource | None = None) -> np.ndarray: ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray: ...
