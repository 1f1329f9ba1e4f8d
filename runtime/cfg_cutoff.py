"""CFG cutoff: classifier-free guidance for the first part of the schedule only, then one conditional denoiser batch
per step — diffusers' ``SDCFGCutoffCallback`` / ``SDXLCFGCutoffCallback`` (diffusers/callbacks.py) as a step
extension, so the loop does not change.

diffusers' callback runs at the end of step ``i``; when ``i == int(num_timesteps * cutoff_step_ratio)`` it keeps the
conditional rows of ``prompt_embeds`` (SDXL: also ``add_text_embeds`` and ``add_time_ids``) and sets guidance to 0.
So steps ``0 .. cutoff`` are guided and every later step runs the conditional batch alone: with 20 steps and 0.5,
11 guided steps and 9 unguided ones. ``cutoff=1.0`` never fires (the index is one past the last step) and ``0.0``
still guides the first step, exactly as diffusers. Step indices count from the first step the call runs (img2img and
``denoising_start`` skip the schedule's beginning; diffusers' ``num_timesteps`` is the steps it runs).

diffusers keeps ``prompt_embeds[-1:]``, the last row, which is the conditional half only for one image; here the
conditional half of every input is kept, so several images per call work (for one image the two agree).
A cutoff on an unguided call (guidance <= 1) changes nothing: there is no unconditional half to drop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .conditioning import Conditioning
from .errors import InputError


def check_cutoff(value) -> float | None:
    """None, or a number in [0, 1] (the fraction of the steps after which guidance stops)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"cfg_cutoff={value!r}; must be a number from 0 to 1 (the fraction of the steps that keep "
                         "classifier-free guidance; 1 keeps it throughout)")
    return float(value)


def conditional_half(cond: Conditioning) -> Conditioning:
    """The conditional rows of a guided conditioning ([uncond; cond] along the batch), unguided."""
    def half(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.split(a, 2)[1])  # (N, ...) from (2N, ...)

    return replace(cond, encoder_hidden_states=half(cond.encoder_hidden_states), guided=False,
                   extra={k: half(v) for k, v in cond.extra.items()})


@dataclass(frozen=True)
class CFGCutoff:
    """A StepExtension (runtime/job.py): after the step at index ``int(steps_run * ratio)`` (counted from the first
    step the job runs), the job's conditioning becomes its conditional half; ``DenoiseJob.batch`` follows it."""

    ratio: float

    def cutoff_index(self, job) -> int:
        begin = job.scheduler.begin_index
        return begin + int((job.end - begin) * self.ratio)

    def after_step(self, job, x: np.ndarray) -> np.ndarray:
        if job.cond.guided and job.step == self.cutoff_index(job):
            job.cond = conditional_half(job.cond)
        return x


def extensions_for(request) -> tuple:
    """The extensions a request's ``cfg_cutoff`` asks for: none when it is unset or the call is unguided."""
    ratio = getattr(request, "cfg_cutoff", None)
    return (CFGCutoff(ratio),) if ratio is not None and request.guided else ()
