"""Prompt adherence of a shapes bundle: generate prompts with fixed seeds, judge the pixels, count."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgediff.defaults import DEFAULT_STEPS
from edgediff.export.recipes.shapes.dataset import Scene, all_scenes, canonical_caption, render

from .judge import judge

ATTRIBUTES = ("colour", "shape", "position", "size", "all")


@dataclass(frozen=True)
class EvalSettings:
    n: int = 200
    steps: int = DEFAULT_STEPS  # eval-default passes the bundle's recommended count when it has one
    guidance: float = 5.0
    scheduler: str | None = None
    seed: int = 0
    batch: int = 8
    # speed options passed to every call, e.g. (("decoder", "tiny"),) or (("cfg_cutoff", 0.5),): judge what they cost
    options: tuple[tuple[str, Any], ...] = ()


def check_options(pipe, s: EvalSettings) -> None:
    """The settings and speed options validated by the pipeline (``Pipeline.request``: nothing runs) before the first
    image, so a bad one is one line, not a half-printed table."""
    pipe.request(canonical_caption(eval_scenes("train", 1, s.seed)[0]), num_inference_steps=s.steps,
                 guidance_scale=s.guidance, scheduler=s.scheduler, **dict(s.options))


def eval_scenes(split: str, n: int, seed: int) -> list[Scene]:
    """``n`` distinct scenes of ``split`` in a seeded order (all of them when n exceeds the split)."""
    pool = all_scenes(split)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[: min(n, len(pool))]]


def evaluate(pipe, split: str, s: EvalSettings, reference=None) -> dict:
    """Per-attribute accuracy on ``split``. With ``reference`` (another pipeline, e.g. the fp32 parent of a
    quantized bundle, or the same bundle to judge ``s.options``, which only this pipeline's calls get) also the mean
    PSNR of this pipeline's images against the reference's for the same prompts and seeds."""
    scenes = eval_scenes(split, s.n, s.seed)
    checks: list[dict[str, bool]] = []
    psnrs: list[float] = []
    for start in range(0, len(scenes), s.batch):
        chunk = scenes[start:start + s.batch]
        kw = dict(num_inference_steps=s.steps, guidance_scale=s.guidance, scheduler=s.scheduler,
                  seed=[s.seed + start + k for k in range(len(chunk))], output_type="pil")
        prompts = [canonical_caption(sc) for sc in chunk]
        result = pipe(prompts, **kw, **dict(s.options))  # the reference runs without them: PSNR is their cost
        checks += [judge(np.asarray(image)).check(sc) for sc, image in zip(chunk, result.images)]
        if reference is not None:
            for a, b in zip(result.images, reference(prompts, **kw).images):
                psnrs.append(psnr(np.asarray(a), np.asarray(b)))
    out = _summary(split, checks)
    if reference is not None:
        out["psnr"] = float(np.mean(psnrs))
    return out


def evaluate_autoencoder(pipe, split: str, n: int, seed: int = 0, batch: int = 8) -> dict:
    """Per-attribute accuracy of the VAE round trip (``Pipeline.autoencode``) of the ground-truth images of the same
    scenes ``evaluate`` prompts for: the ceiling of any denoiser through this bundle's VAE. Also the mean PSNR of
    the round trips against the ground truth."""
    scenes = eval_scenes(split, n, seed)
    checks: list[dict[str, bool]] = []
    psnrs: list[float] = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        truth = np.stack([render(sc) for sc in chunk])  # (B, 64, 64, 3) uint8
        for sc, t, image in zip(chunk, truth, pipe.autoencode(truth)):
            checks.append(judge(image).check(sc))
            psnrs.append(psnr(image, t))
    return {**_summary(split, checks), "psnr": float(np.mean(psnrs))}


def _summary(split: str, checks: list[dict[str, bool]]) -> dict:
    """Accuracy per attribute over the judged images (one ``Verdict.check`` dict each)."""
    return {"split": split, "n": len(checks), **{a: sum(c[a] for c in checks) / len(checks) for a in ATTRIBUTES}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical; capped at 100 for averaging)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0**2 / mse))


def report_lines(pipe, splits: list[str], s: EvalSettings, *, reference=None, autoencode: bool = False):
    """The ``edgediff eval-default`` table, one line at a time (each split's row as soon as it is measured)."""
    head = f"{'split':<9}{'n':>5}" + "".join(f"{a:>10}" for a in ATTRIBUTES)

    def row(split: str, r: dict, psnr_shown: bool) -> str:
        return (f"{split:<9}{r['n']:>5}" + "".join(f"{100 * r[a]:>9.1f}%" for a in ATTRIBUTES)
                + (f"   {r['psnr']:.1f} dB" if psnr_shown else ""))

    if autoencode:
        yield head + "   PSNR vs ground truth   (VAE round trip of ground-truth images)"
        for split in splits:
            yield row(split, evaluate_autoencoder(pipe, split, s.n, s.seed), True)
        return
    options = ", ".join(f"{k}={v}" for k, v in s.options)
    yield (f"{s.steps} steps, guidance {s.guidance:g}, scheduler {s.scheduler or 'bundle default'}, seeds {s.seed}.."
           f"{s.seed + s.n - 1}" + (f", speed options: {options}" if options else ""))
    yield head + ("   PSNR vs reference" if reference is not None else "")
    for split in splits:
        yield row(split, evaluate(pipe, split, s, reference=reference), reference is not None)
