"""The one scheduler protocol. The denoising loop talks to every scheduler through it, indexed by step.

    sched = make_scheduler("euler", config)      # config: SchedulerConfig read from scheduler_config.json
    sched.set_timesteps(num_inference_steps)     # InputError, before any state changes, for a count it cannot run
    x = x * sched.init_noise_sigma
    for i in range(sched.begin_index, len(sched.timesteps)):
        eps = unet(sched.scale_model_input(x, i), sched.timesteps[i])
        x = sched.step(eps, i, x, noise)

A scheduler instance holds the state of one generation (multistep history): make one per call, never share it
between threads. The implementations share their code through ``base.SchedulerBase``.

Two kinds, one protocol. ``kind`` is "diffusion" (DDPM-trained UNets: epsilon/v/sample prediction) or "flow"
(rectified-flow transformers, SD3/FLUX: the model predicts a velocity); ``make_scheduler`` refuses a scheduler of the
other kind than the bundle's scheduler_config (its ``_class_name``), naming those that fit. The loop above is the same
for both — flow schedulers have init_noise_sigma 1 and an identity scale_model_input — and never asks which kind.

Schedule inputs. Flow-matching pipelines pass more than a step count, as diffusers' pipelines pass them to
``set_timesteps``: ``mu`` (the resolution-dependent shift, flow_shift.mu_for(config, image_seq_len)) and ``sigmas``
(FluxPipeline's np.linspace(1, 1/n, n), flow_shift.flux_sigmas). They are keyword-only and default to None, so every
scheduler has the same signature and a pipeline passes what its family needs without asking which scheduler it has:

    sched.set_timesteps(n)                                   # SD 1/2/XL, SD3 without dynamic shifting
    sched.set_timesteps(n, mu=mu, sigmas=flux_sigmas(n))     # FLUX (SD3: mu= only with use_dynamic_shifting)

A scheduler whose diffusers twin does not take one of them (``schedule_inputs`` lists those it takes) refuses it by
name with an InputError, before any state changes, as diffusers fails there too; flow_euler takes both.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..noise import NoiseSource


class Scheduler(Protocol):
    name: str  # registry name: "pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "unipc",
    # "flow_euler", "flow_heun"
    kind: str  # "diffusion" or "flow": which bundles it runs (the scheduler config's kind)
    timesteps: np.ndarray  # (N,) the model's timestep input per step, as diffusers feeds it to the UNet/transformer
    init_noise_sigma: float  # initial latents = standard normal * init_noise_sigma
    order: int  # diffusers' order: img2img skips `t_start * order` entries
    begin_index: int  # first index to run (0, or set by set_begin_index for img2img)

    def set_timesteps(self, num_inference_steps: int, *, mu: float | None = None,
                      sigmas: Sequence[float] | None = None) -> None: ...

    def set_begin_index(self, begin_index: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, noise: NoiseSource | None = None) -> np.ndarray: ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray: ...
