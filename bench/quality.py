"""Speed levers measured against the plain run: time per image, the speed ratios, and the quality cost as PSNR and
SSIM of each lever's image against the plain run's image of the same seed (``edgediff bench sweep --decoder tiny
--cfg-cutoff 0.5 --vae-tiling --cache-interval 3``).

The plain run and every lever run interleaved, one generation each per round (plain, lever 1, lever 2, ...; round
``r`` uses seed ``seed + 1000 (r + 1)`` for all of them, as ``runner.measure`` does), in one process with one loaded
pipeline: drift on a shared machine hits them alike, and the images compared come from the same initial noise.

Metrics on uint8 RGB images, numpy only:

- PSNR = 10 log10(255^2 / MSE) in dB over every pixel and channel; identical images give 100 dB (a cap, as
  ``edgediff eval-default --reference`` does, so that means stay finite).
- SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image quality assessment: from error visibility to structural
  similarity", IEEE TIP 13(4), 2004, eq. 13): local means, variances and covariance under a Gaussian window of
  11x11 taps, sigma 1.5 (normalised to sum 1), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255, population (not sample)
  statistics; computed per R, G, B channel and averaged; the image edge is mirrored (``d c b a | a b c d``) for the
  filter and the 5 pixels of each border, where the window would reach past the image, are left out of the mean.
  These are scikit-image's ``structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False)`` settings (the paper's); tests/bench/test_quality_metrics.py checks the
  two agree.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgediff.errors import EdgediffError, InputError

from .memory import PeakRss
from .runner import BenchConfig, Row, Samples

# -- metrics ---------------------------------------------------------------------------------------------------------
PSNR_CAP = 100.0  # dB for identical images
SSIM_SIGMA = 1.5  # Wang et al. 2004, section III.C: Gaussian weighting, standard deviation 1.5 pixels
SSIM_RADIUS = 5  # 11 taps: int(3.5 sigma + 0.5), the window the paper uses
SSIM_K1, SSIM_K2 = 0.01, 0.03  # the paper's constants (eq. 7 and 9)
DATA_RANGE = 255.0  # L: uint8 images


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise InputError(f"PSNR/SSIM compare two uint8 RGB images of one shape (H, W, 3), not {a.dtype} {a.shape} "
                         f"and {b.dtype} {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two (H, W, 3) uint8 images (PSNR_CAP when identical)."""
    x, y = _check_pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * math.log10(DATA_RANGE**2 / mse))


def _gaussian_taps() -> np.ndarray:
    """(11,) float64, sums to 1: the separable factor of the 11x11 window."""
    k = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _blur(x: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, C): the Gaussian window along H then W, the edge mirrored (d c b a | a b c d)."""
    taps, r = _gaussian_taps(), SSIM_RADIUS
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        p = np.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(taps))
    return x


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two (H, W, 3) uint8 images, per channel then averaged (settings in the module docstring)."""
    x, y = _check_pair(a, b)
    r = SSIM_RADIUS
    if min(x.shape[:2]) < 2 * r + 1:
        raise InputError(f"SSIM needs images at least {2 * r + 1}x{2 * r + 1} pixels (its window), not "
                         f"{x.shape[1]}x{x.shape[0]}")
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mx, my = _blur(x), _blur(y)
    vx = _blur(x * x) - mx * mx  # population variance under the window (weights sum to 1)
    vy = _blur(y * y) - my * my
    cxy = _blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # eq. 13, per pixel
    return float(s[r:-r, r:-r].mean())  # the mean over pixels and channels = the mean of the channels' means


# -- levers ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lever:
    """One speed option as ``Pipeline.__call__`` keywords (``options``, empty for the plain run) and its label."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


PLAIN = Lever("plain")


def levers(*, decoder: Sequence[str] = (), cfg_cutoff: Sequence[float] = (), vae_tiling: bool = False,
           vae_tile_size: Sequence[int] = (), cache_interval: Sequence[int] = (),
           cache_branch: int | None = None, cache_schedule: str | None = None, cache_center: int | None = None,
           cache_pow: float | None = None) -> list[Lever]:
    """The levers the sweep options name, one per value, each alone (not combined): ``--decoder tiny``,
    ``--cfg-cutoff 0.3,0.5``, ``--vae-tiling`` (with ``--vae-tile-size 256,384``, one tiled lever per tile size
    instead of the VAE's own), ``--cache-interval 2,3`` (with ``--cache-branch``, DeepCache's
    ``cache_branch=`` passed along with each interval, and ``--cache-schedule quadratic`` with ``--cache-center`` /
    ``--cache-pow``, the paper's non-uniform schedule, likewise). ``decoder="full"`` is the plain run's own and adds
    none."""
    out = [Lever(f"decoder={d}", (("decoder", d),)) for d in dict.fromkeys(decoder) if d != "full"]
    out += [Lever(f"cfg_cutoff={c:g}", (("cfg_cutoff", float(c)),)) for c in dict.fromkeys(cfg_cutoff)]
    if vae_tile_size and not vae_tiling:
        raise InputError("--vae-tile-size sets the tile of the --vae-tiling lever; add --vae-tiling")
    if vae_tiling and not vae_tile_size:
        out.append(Lever("vae_tiling", (("vae_tiling", True),)))
    for px in dict.fromkeys(vae_tile_size) if vae_tiling else ():
        out.append(Lever(f"vae_tiling,tile={px}", (("vae_tiling", True), ("vae_tile_size", int(px)))))
    for n in dict.fromkeys(cache_interval):
        opts: tuple[tuple[str, Any], ...] = (("cache_interval", int(n)),)
        name = f"cache_interval={n}"
        if cache_branch is not None:
            opts += (("cache_branch", int(cache_branch)),)
            name += f",branch={cache_branch}"
        for key, value in (("cache_schedule", cache_schedule), ("cache_center", cache_center),
                           ("cache_pow", cache_pow)):
            if value is not None:
                opts += ((key, value),)
                name += f",{key.removeprefix('cache_')}={value:g}" if isinstance(value, float) else \
                    f",{key.removeprefix('cache_')}={value}"
        out.append(Lever(name, opts))
    if cache_branch is not None and not cache_interval:
        raise InputError("--cache-branch picks DeepCache's cached block and needs --cache-interval N")
    if not cache_interval and (cache_schedule, cache_center, cache_pow) != (None, None, None):
        raise InputError("--cache-schedule, --cache-center and --cache-pow shape DeepCache's schedule and need "
                         "--cache-interval N")
    return out


def check_levers(pipe, cfg: BenchConfig, lever_list: Sequence[Lever]) -> None:
    """Every lever's call validated by the pipeline (``Pipeline.request``: nothing runs) before any is measured, so
    a bundle without the tiny decoder or a cutoff outside [0, 1] is the pipeline's own one-line refusal."""
    for lever in lever_list:
        try:
            pipe.request(cfg.prompt, **cfg.call_kwargs(), **lever.kwargs())
        except EdgediffError as exc:  # the same kind (and exit code), the lever named first
            raise type(exc)(f"bench lever {lever.name}: {exc}") from None


def measure_levers(cfg: BenchConfig, pipe, lever_list: Sequence[Lever]) -> list[Row]:
    """The plain run and each lever interleaved (module docstring): one ``Row`` each, plain first. Each lever's row
    has ``lever`` = {name, options, vs: "plain", ratio: {latency_per_image, unet_per_image, vae_decode} (lever /
    plain, means; below 1 is faster), quality: {psnr, ssim: {mean, min}, images}}; the plain row's ``lever`` names
    it. ``peak_rss_bytes`` of each is the process's peak during that option's own generations, in a process that
    also ran the others (an allocator keeps what an earlier one grew): not that option's peak alone."""
    runs = [PLAIN, *lever_list]
    check_levers(pipe, cfg, lever_list)
    call = lambda lever, seed: pipe(cfg.prompt, **{**cfg.call_kwargs(), "seed": seed}, **lever.kwargs())  # noqa: E731
    first: dict[str, float] = {}
    for w in range(max(1, cfg.warmup)):  # the first image of each counts as one warm-up, as in runner.measure
        for lever in runs:
            t0 = time.perf_counter()
            call(lever, cfg.seed)
            first.setdefault(lever.name, time.perf_counter() - t0)
    samples = {lever.name: Samples() for lever in runs}
    peaks: dict[str, int | None] = {lever.name: None for lever in runs}
    scores: dict[str, dict[str, list[float]]] = {lever.name: {"psnr": [], "ssim": []} for lever in lever_list}
    for r in range(cfg.runs):
        seed = cfg.seed + 1000 * (r + 1)
        plain_images: list[np.ndarray] = []
        for lever in runs:
            with PeakRss() as mem:
                res = call(lever, seed)
            samples[lever.name].add(res)
            if mem.peak is not None:
                peaks[lever.name] = max(peaks[lever.name] or 0, mem.peak)
            images = [np.asarray(im.convert("RGB")) for im in res.images]  # (H, W, 3) uint8 each
            if lever is PLAIN:
                plain_images = images
                continue
            for ours, plain in zip(images, plain_images, strict=True):
                scores[lever.name]["psnr"].append(psnr(ours, plain))
                scores[lever.name]["ssim"].append(ssim(ours, plain))
    rows = {lever.name: samples[lever.name].row(cfg, load=float("nan"), first=first[lever.name],
                                                 peak_rss=peaks[lever.name]) for lever in runs}
    base = samples[PLAIN.name]
    rows[PLAIN.name].lever = {"name": PLAIN.name, "options": {}, "vs": None, "ratio": None, "quality": None}
    for lever in lever_list:
        s, q = samples[lever.name], scores[lever.name]
        rows[lever.name].lever = {
            "name": lever.name, "options": lever.kwargs(), "vs": PLAIN.name,
            "ratio": {"latency_per_image": _ratio(s.totals, base.totals),
                      "unet_per_image": _ratio(s.unet_per_image, base.unet_per_image),
                      "vae_decode": _ratio(s.per_stage["vae_decode"], base.per_stage["vae_decode"])},
            "quality": {"psnr": {"mean": float(np.mean(q["psnr"])), "min": float(np.min(q["psnr"]))},
                        "ssim": {"mean": float(np.mean(q["ssim"])), "min": float(np.min(q["ssim"]))},
                        "images": len(q["psnr"])}}
    return [rows[lever.name] for lever in runs]


def _ratio(ours: Sequence[float], plain: Sequence[float]) -> float | None:
    """mean(ours) / mean(plain); None when either has no samples or plain's mean is 0."""
    if not ours or not plain or sum(plain) == 0:
        return None
    return (sum(ours) / len(ours)) / (sum(plain) / len(plain))


def table(rows: Sequence[dict]) -> str:
    """The levers table: each lever's time per image and ratios to the plain run of the same configuration and
    bundle (same run, interleaved), and its PSNR/SSIM against the plain images of the same seeds."""
    levered = [r for r in rows if (r.get("lever") or {}).get("vs")]
    if not levered:
        return ""
    w = max(26, *(len(r["lever"]["name"]) + 1 for r in levered))  # whole names: two may share a long prefix
    out = ["speed levers vs the plain run (same run, interleaved, same seeds; ratio < 1 is faster; PSNR/SSIM of "
           "each image against the plain image of its seed):",
           f"  {'bundle':<16}{'config':<22}{'lever':<{w}}{'per image':>10}{'ratio':>8}{'unet':>8}{'decode':>8}"
           f"{'PSNR dB':>9}{'min':>7}{'SSIM':>8}{'min':>7}"]
    plain = {_key(r): r for r in rows if (r.get("lever") or {}).get("name") == PLAIN.name}
    for r in levered:
        lv, c = r["lever"], r["config"]
        p = plain.get(_key(r))
        if p is not None:
            name = (r.get("variant") or {}).get("path") or c["bundle"]
            out.append(f"  {_tail(name, 15):<16}{_config_label(c):<22}{'plain':<{w}}{p['latency_per_image']:>9.3f}s"
                       f"{1.0:>8.3f}{1.0:>8.3f}{1.0:>8.3f}{'':>9}{'':>7}{'':>8}{'':>7}")
            plain.pop(_key(r))  # the plain line once, above its configuration's first lever
        q, ratio = lv["quality"], lv["ratio"]
        out.append(f"  {'':<16}{'':<22}{lv['name']:<{w}}{r['latency_per_image']:>9.3f}s{_fmt(ratio['latency_per_image'])}"
                   f"{_fmt(ratio['unet_per_image'])}{_fmt(ratio['vae_decode'])}{q['psnr']['mean']:>9.2f}"
                   f"{q['psnr']['min']:>7.1f}{q['ssim']['mean']:>8.4f}{q['ssim']['min']:>7.3f}")
    return "\n".join(out) + "\n"


def _key(row: dict) -> tuple:
    c = row["config"]
    return tuple(c[k] for k in ("bundle", "backend", "steps", "height", "width", "batch", "scheduler"))


def _config_label(c: dict) -> str:
    size = f"{c['width']}x{c['height']}" if c["width"] else "native"
    return f"{c['steps']} steps {size} b{c['batch']}"


def _tail(path: str, n: int) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= n else name[: n - 1] + "~"


def _fmt(v: float | None) -> str:
    return f"{v:>8.3f}" if v is not None else f"{'-':>8}"
