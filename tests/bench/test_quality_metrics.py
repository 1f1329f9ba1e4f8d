"""PSNR and SSIM of bench/quality.py: against scikit-image's structural_similarity with Wang et al.'s settings
(the dev extra pins scikit-image as a test-only reference) and against cases computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgediff.bench.quality import PSNR_CAP, psnr, ssim
from edgediff.errors import InputError


def pair(seed: int, h: int = 40, w: int = 56, noise: float = 20.0):
    """A smooth random image and a noisy copy, both (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 90 * np.sin(xx[..., None] / (3 + seed) + np.arange(3)) * np.cos(yy[..., None] / 5)
    a = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    b = np.clip(a + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
    return a, b


@pytest.mark.parametrize("seed,h,w,noise", [(0, 40, 56, 20.0), (1, 11, 11, 5.0), (2, 64, 64, 60.0), (3, 17, 90, 1.0)])
def test_ssim_matches_scikit_image_with_wang_et_al_settings(seed, h, w, noise):
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the reference (pip install '.[dev]')")
    a, b = pair(seed, h, w, noise)
    theirs = metrics.structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(theirs, abs=1e-9)
    assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)


def test_identical_images_are_perfect():
    a, _ = pair(4)
    assert psnr(a, a) == PSNR_CAP and ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_constant_images_by_hand():
    """Two flat images (100 and 110): every window has zero variance, so SSIM is the luminance term alone,
    (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) with C1 = (0.01 * 255)^2; MSE is 100."""
    a = np.full((16, 20, 3), 100, np.uint8)
    b = np.full((16, 20, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1), rel=1e-12)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-12)


def test_ssim_sees_structure_that_psnr_weighs_alike():
    """Same MSE, different structure: a constant shift keeps SSIM near 1, the same energy as noise does not."""
    a, _ = pair(5, noise=0)
    shifted = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    noisy = np.clip(a.astype(int) + rng.choice([-10, 10], a.shape), 0, 255).astype(np.uint8)
    assert abs(psnr(a, shifted) - psnr(a, noisy)) < 0.5
    assert ssim(a, shifted) > 0.99 and ssim(a, noisy) < 0.9


@pytest.mark.parametrize("a,b,match", [
    (np.zeros((8, 20, 3), np.uint8), np.zeros((8, 20, 3), np.uint8), "at least 11x11"),
    (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 17, 3), np.uint8), "one shape"),
    (np.zeros((16, 16, 3), np.float32), np.zeros((16, 16, 3), np.float32), "uint8 RGB"),
    (np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8), "uint8 RGB"),
])
def test_bad_pairs_are_one_line(a, b, match):
    with pytest.raises(InputError, match=match):
        ssim(a, b)
