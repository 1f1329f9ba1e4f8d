"""Noise for parity tests: what diffusers draws with one torch.Generator for a whole batch."""
from __future__ import annotations

import numpy as np


class StreamFrom:
    """One torch-compatible stream shared by the whole batch, as diffusers draws with a single generator."""

    def __init__(self, seed):
        from edgediff.noise import TorchNoise

        self._n = TorchNoise([seed])
        self.seeds = (seed,)

    def standard_normal(self, shape):
        return self._n.standard_normal((1, int(np.prod(shape)))).reshape(shape)
