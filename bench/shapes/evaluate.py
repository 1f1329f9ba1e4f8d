"""Prompt adherence of a shapes bundle: generate prompts with fixed seeds, judge the pixels, count."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import Scene, all_scenes, canonical_caption
from .judge import judge

ATTRIBUTES = ("colour", "shape", "position", "size", "all")


@dataclass(frozen=True)
class EvalSettings:
    n: int = 200
    steps: int = 20
    guidance: float = 5.0
    scheduler: str | None = None
    seed: int = 0
    batch: int = 8


def eval_scenes(split: str, n: int, seed: int) -> list[Scene]:
    """``n`` distinct scenes of ``split`` in a seeded order (all of them when n exceeds the split)."""
    pool = all_scenes(split)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[: min(n, len(pool))]]


def evaluate(pipe, split: str, s: EvalSettings) -> dict:
    scenes = eval_scenes(split, s.n, s.seed)
    hits = {a: 0 for a in ATTRIBUTES}
    for start in range(0, len(scenes), s.batch):
        chunk = scenes[start:start + s.batch]
        result = pipe([canonical_caption(sc) for sc in chunk], num_inference_steps=s.steps, guidance_scale=s.guidance,
                      scheduler=s.scheduler, seed=[s.seed + start + k for k in range(len(chunk))], output_type="pil")
        for sc, image in zip(chunk, result.images):
            for k, ok in judge(np.asarray(image)).check(sc).items():
                hits[k] += ok
    return {"split": split, "n": len(scenes), **{a: hits[a] / len(scenes) for a in ATTRIBUTES}}
