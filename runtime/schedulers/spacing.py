"""How ``num_inference_steps`` picks training timesteps: diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2),
written once for every scheduler. Each scheduler casts the result to the dtype its diffusers twin feeds the UNet."""
from __future__ import annotations

import numpy as np


def spaced_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int = 0, *,
                     extra: int = 0, integer: bool = True) -> np.ndarray:
    """(n,) float64 timesteps, descending.

    "linspace": evenly from 0 to T - 1, both ends included; "leading": multiples of T // n from 0, plus
    ``steps_offset``; "trailing": down from T - 1 in steps of T / n. ``extra=1`` is the multistep solvers' variant
    (DPM-Solver, UniPC): linspace and leading space n + 1 points and drop the lowest, since the solver appends its own
    final sigma. ``integer=False`` keeps linspace's fractional timesteps (Euler's)."""
    T = num_train_timesteps
    if spacing == "trailing":
        # np.arange can yield an (n + 1)-th point just above 0 when T / n is inexact (e.g. n = 61 of 1000), which
        # diffusers keeps as timestep -1: an extra model call whose alpha_bar index wraps to the noisiest timestep.
        # Only the first n points are the schedule; they are diffusers' values exactly.
        return np.arange(T, 0, -T / n)[:n].round() - 1
    if spacing == "linspace":
        ascending = np.linspace(0, T - 1, n + extra)
        ascending = ascending.round() if integer else ascending
    else:  # leading
        ascending = (np.arange(0, n + extra) * (T // (n + extra)) + steps_offset).astype(np.float64)
    return ascending[::-1][:n].copy()
