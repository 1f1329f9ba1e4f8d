"""Explicit randomness. Every random draw of a generation comes from a ``NoiseSource`` passed in by the caller.

A source holds one independent stream per image (one seed per image), so that image k of a batch is the same
image whatever the batch size — the contract diffusers has with a list of ``torch.Generator``.
"""
from __future__ import annotations

import secrets
from typing import Protocol, Sequence

import numpy as np

from .errors import InputError

RNGS = ("numpy", "torch")


class NoiseSource(Protocol):
    """Draws standard-normal float32 noise; ``shape[0]`` is the number of images, one stream each."""

    seeds: tuple[int, ...]

    def standard_normal(self, shape: Sequence[int]) -> np.ndarray: ...


def seeds_for(seed: int | Sequence[int] | None, count: int) -> tuple[int, ...]:
    """One seed per image: ``seed, seed+1, ...``; a list is taken as given; None draws a fresh base seed."""
    if seed is None:
        seed = secrets.randbits(31)
    if isinstance(seed, (list, tuple)):
        if len(seed) != count or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
            raise InputError(f"seed list has {len(seed)} entries for {count} images; give one integer per image")
        seeds = tuple(seed)
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, not {type(seed).__name__}")
    else:
        seeds = tuple(int(seed) + k for k in range(count))
    if any(not 0 <= s < 2**63 for s in seeds):
        raise InputError(f"seeds must be in [0, 2**63); got {seeds[0]}")
    return seeds


class _PerImage:
    def __init__(self, seeds: Sequence[int]):
        self.seeds = tuple(seeds)

    def standard_normal(self, shape: Sequence[int]) -> np.ndarray:
        shape = tuple(int(d) for d in shape)
        if shape[0] != len(self.seeds):
            raise InputError(f"noise for {shape[0]} images requested from {len(self.seeds)} seeded streams")
        per = int(np.prod(shape[1:]))
        out = np.empty((shape[0], per), np.float32)  # (N, prod(shape[1:])) float32
        for k in range(shape[0]):
            out[k] = self._draw(k, per)
        return out.reshape(shape)

    def _draw(self, k: int, n: int) -> np.ndarray:
        raise NotImplementedError  # abstract: each subclass draws from its own generator


class NumpyNoise(_PerImage):
    """numpy's PCG64 per image: fast, portable, the default."""

    def __init__(self, seeds: Sequence[int]):
        super().__init__(seeds)
        self._gens = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]

    def _draw(self, k: int, n: int) -> np.ndarray:
        return self._gens[k].standard_normal(n, dtype=np.float32)


class TorchNoise(_PerImage):
    """What ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` returns, without torch.

    torch's CPU generator is MT19937 seeded with the low 32 bits of the seed. Float uniforms take the low 24 bits of
    one 32-bit draw; tensors of >= 16 elements are filled with uniforms and transformed in blocks of 16 by
    Box-Muller (u1 = 1 - x[j], u2 = x[j + 8]; r = sqrt(-2 ln u1); x[j] = r cos 2pi u2, x[j + 8] = r sin 2pi u2); a
    remainder re-draws 16 fresh uniforms for the last 16 elements. Smaller tensors use a double-precision scalar
    Box-Muller with 53-bit uniforms and a cached second value.
    """

    def __init__(self, seeds: Sequence[int]):
        super().__init__(seeds)
        self._mts = []
        for s in self.seeds:
            mt = np.random.MT19937(0)
            mt._legacy_seeding(s & 0xFFFFFFFF)  # numpy's init_genrand == std::mt19937(seed)
            self._mts.append(mt)
        self._cached: list[float | None] = [None] * len(self.seeds)

    def _u32(self, k: int, n: int) -> np.ndarray:
        return self._mts[k].random_raw(n).astype(np.uint32)

    def _uniform_f32(self, k: int, n: int) -> np.ndarray:
        return (self._u32(k, n) & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)

    @staticmethod
    def _box_muller16(u: np.ndarray) -> np.ndarray:
        u = u.reshape(-1, 16)
        u1 = np.float32(1.0) - u[:, :8]
        u2 = u[:, 8:]
        # torch evaluates this in float32 with SLEEF's vector logf/sincosf on AVX2 CPUs and libm elsewhere, so
        # torch itself differs across machines in the last ulp. This operation order (log correctly rounded, the
        # rest in float32) matches torch's AVX2 kernel bit for bit on ~92% of elements, and within 1 ulp on all.
        log_u1 = np.log(u1.astype(np.float64)).astype(np.float32)
        r = np.sqrt(np.float32(-2.0) * log_u1)
        theta = np.float32(2.0 * np.pi) * u2
        return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)

    def _draw(self, k: int, n: int) -> np.ndarray:
        if n >= 16:
            u = self._uniform_f32(k, n)
            out = np.empty(n, np.float32)
            full = n - n % 16
            out[:full] = self._box_muller16(u[:full])
            if n % 16:
                out[n - 16:] = self._box_muller16(self._uniform_f32(k, 16))
            return out
        return np.array([self._scalar_normal(k) for _ in range(n)], np.float32)

    def _scalar_normal(self, k: int) -> float:
        if self._cached[k] is not None:
            value, self._cached[k] = self._cached[k], None
            return value
        def u53() -> float:
            hi, lo = (int(x) for x in self._u32(k, 2))
            return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53
        u1, u2 = u53(), u53()
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached[k] = float(r * np.sin(theta))
        return float(r * np.cos(theta))


def make_noise(kind: str, seeds: Sequence[int]) -> NoiseSource:
    if kind == "numpy":
        return NumpyNoise(seeds)
    if kind == "torch":
        return TorchNoise(seeds)
    raise InputError(f"unknown rng {kind!r}; expected one of {list(RNGS)}")
