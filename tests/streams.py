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


def assert_images_close(ours, theirs, tol: float = 1e-3) -> None:
    """Parity of images (a list of (H, W, 3) arrays or PIL images vs diffusers' array): max abs difference within
    ``tol`` (float images in [0, 1]; uint8 images in pixel levels), named with the worst element; and the reference
    is no constant image, so the comparison means something."""
    ours = np.stack([np.asarray(i, np.float32) for i in ours])
    theirs = np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, f"shape {ours.shape}, diffusers {theirs.shape}"
    err = np.abs(ours - theirs)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() <= tol, f"max abs {err.max():.2e} > {tol} at {worst}"
    assert theirs.std() > 0.01 * (255 if theirs.max() > 1.5 else 1)  # not a constant image
