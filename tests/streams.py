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


class TorchGeneratorNoise:
    """Draws exactly what diffusers' stochastic scheduler steps draw from a ``torch.Generator`` of the same seed
    (torch itself: the reference side of a scheduler parity test)."""

    def __init__(self, seed: int):
        import torch

        self._torch = torch
        self.gen = torch.Generator().manual_seed(seed)
        self.seeds = (seed,)

    def standard_normal(self, shape):
        return self._torch.randn(tuple(shape), generator=self.gen, dtype=self._torch.float32).numpy()


def fake_model(x: np.ndarray, t: float, k: int) -> np.ndarray:
    """A deterministic stand-in for the denoiser in scheduler parity tests: a fixed unit-variance field per call
    plus a weak dependence on the sample and the timestep (a model output of ~0.9 x would make x0 = (x - sigma eps)
    / alpha a cancellation that amplifies rounding and tests nothing more)."""
    field = np.random.default_rng(1000 + k).standard_normal(x.shape).astype(np.float32)
    return (field + 0.1 * np.tanh(x) + 0.01 * np.sin(t / 100.0)).astype(np.float32)
