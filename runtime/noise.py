"""Explicit randomness. Every random draw of a generation comes from a ``NoiseSource`` passed in by the caller.

A source holds one independent stream per image (one seed per image), so that image k of a batch is the same
image whatever the batch size — the contract diffusers has with a list of ``torch.Generator``.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class NoiseSource(Protocol):
    """Draws standard-normal float32 noise; ``shape[0]`` is the number of images, one stream each."""

    seeds: tuple[int, ...]

    def standard_normal(self, shape: Sequence[int]) -> np.ndarray: ...
