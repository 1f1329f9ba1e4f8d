"""SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): the ``time_ids`` the UNet embeds next to the pooled
text, computed as diffusers 0.42's StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline compute them.

A row is (original_size, crops_coords_top_left, target_size), six numbers, or with the refiner's
requires_aesthetics_score (original_size, crops_coords_top_left, aesthetic_score), five. Sizes are (height, width).

Two behaviours of diffusers are reproduced on purpose, so that images match it (edgediff's promise), and named here:
- txt2img: the negative row is used only when both ``negative_original_size`` and ``negative_target_size`` are
  given, and the guided batch is ``[neg, pos]`` tiled per image ([n, p, n, p, ...] for 2 images), while the text
  embeddings are [n, n, p, p]: with explicit negative sizes and more than one image, images past the first mix them.
- img2img without aesthetic score: the negative row takes the *positive* crop (diffusers' ``_get_add_time_ids``
  ignores ``negative_crops_coords_top_left`` in that branch; tracked upstream as issue 2 of diffusers#13610).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BundleError, InputError

PIPELINES = ("txt2img", "img2img")

Pair = tuple[int, int]


@dataclass(frozen=True)
class MicroConditioning:
    """The call's micro-conditioning arguments, named and defaulted as in diffusers' SDXL pipelines."""

    original_size: Pair | None = None  # None: the output (height, width)
    crops_coords_top_left: Pair = (0, 0)
    target_size: Pair | None = None  # None: the output (height, width)
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair = (0, 0)
    negative_target_size: Pair | None = None
    aesthetic_score: float = 6.0  # refiner only (requires_aesthetics_score)
    negative_aesthetic_score: float = 2.5

    def __post_init__(self) -> None:
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            value = getattr(self, name)
            if value is None and "crops" not in name:
                continue
            object.__setattr__(self, name, _pair(value, name, allow_zero="crops" in name))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name}={value!r}; expected a finite number (diffusers' default: "
                                 f"{6.0 if name == 'aesthetic_score' else 2.5})")


def _pair(value, name: str, *, allow_zero: bool) -> Pair:
    low = 0 if allow_zero else 1
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)):
        kind = "integers >= 0" if allow_zero else "positive integers"
        raise InputError(f"{name}={value!r}; expected (height, width) as two {kind}")
    return int(value[0]), int(value[1])


def add_time_ids(original_size: Pair, crops_coords_top_left: Pair, target_size: Pair, aesthetic_score: float = 6.0,
                 *, requires_aesthetics_score: bool = False) -> np.ndarray:
    """One row of time ids, (1, 6) float32 (or (1, 5) with requires_aesthetics_score): diffusers' list
    ``original_size + crops_coords_top_left + target_size`` (or ``+ (aesthetic_score,)``)."""
    tail = (aesthetic_score,) if requires_aesthetics_score else tuple(target_size)
    return np.array([[*original_size, *crops_coords_top_left, *tail]], dtype=np.float32)


def time_id_rows(height: int, width: int, micro: MicroConditioning, *, requires_aesthetics_score: bool,
                 pipeline: str) -> tuple[np.ndarray, np.ndarray]:
    """(time_ids, negative_time_ids), each (1, k) float32, for an output of ``height`` x ``width`` pixels, with the
    defaults of diffusers' ``pipeline`` ("txt2img": StableDiffusionXLPipeline, "img2img": ...Img2ImgPipeline)."""
    if pipeline not in PIPELINES:
        raise InputError(f"pipeline={pipeline!r}; expected one of {list(PIPELINES)}")
    original = micro.original_size or (height, width)
    target = micro.target_size or (height, width)
    if pipeline == "txt2img":
        if requires_aesthetics_score:  # StableDiffusionXLPipeline has no aesthetic score: a refiner is img2img only
            raise InputError("this model is an SDXL refiner (requires_aesthetics_score): it refines an image; pass "
                             "image= (img2img, or the base model's latents), or use an SDXL base model for text-to-image")
        pos = add_time_ids(original, micro.crops_coords_top_left, target)
        if micro.negative_original_size is not None and micro.negative_target_size is not None:
            neg = add_time_ids(micro.negative_original_size, micro.negative_crops_coords_top_left,
                               micro.negative_target_size)
        else:
            neg = pos
        return pos, neg
    neg_original = micro.negative_original_size or original
    neg_target = micro.negative_target_size or target
    pos = add_time_ids(original, micro.crops_coords_top_left, target, micro.aesthetic_score,
                       requires_aesthetics_score=requires_aesthetics_score)
    # diffusers: the aesthetic branch uses the negative crop, the other one the positive crop (see module doc)
    neg_crop = micro.negative_crops_coords_top_left if requires_aesthetics_score else micro.crops_coords_top_left
    neg = add_time_ids(neg_original, neg_crop, neg_target, micro.negative_aesthetic_score,
                       requires_aesthetics_score=requires_aesthetics_score)
    return pos, neg


def batch_time_ids(time_ids: np.ndarray, negative_time_ids: np.ndarray, *, images: int, guided: bool,
                   pipeline: str) -> np.ndarray:
    """The UNet's ``time_ids`` input, (2N, k) when guided else (N, k) float32, N = ``images`` (prompts x images per
    prompt), laid out as diffusers lays it out for ``pipeline`` (see the module doc)."""
    if pipeline not in PIPELINES:
        raise InputError(f"pipeline={pipeline!r}; expected one of {list(PIPELINES)}")
    if not guided:
        return np.repeat(time_ids, images, axis=0)
    if pipeline == "txt2img":  # torch.cat([neg, pos]).repeat(N, 1)
        return np.tile(np.concatenate([negative_time_ids, time_ids]), (images, 1))
    # img2img: cat([neg.repeat(N, 1), pos.repeat(N, 1)]), aligned with the [uncond; cond] text embeddings
    return np.concatenate([np.repeat(negative_time_ids, images, axis=0), np.repeat(time_ids, images, axis=0)])


def check_add_embedding(unet_config: dict, *, time_ids: int, pooled_dim: int, where: str) -> None:
    """The UNet's add-embedding input must be addition_time_embed_dim x time ids + the pooled width: the check of
    diffusers' _get_add_time_ids, made when a bundle is opened instead of at the first call."""
    per_id = unet_config.get("addition_time_embed_dim")
    expected = unet_config.get("projection_class_embeddings_input_dim")
    if not isinstance(per_id, int) or not isinstance(expected, int):
        raise BundleError(f"{where}: unet/config.json has no addition_time_embed_dim / "
                          "projection_class_embeddings_input_dim; this is not an SDXL UNet")
    passed = per_id * time_ids + pooled_dim
    if passed == expected:
        return
    if expected - passed == per_id:
        fix = "it takes 6 time ids (a base model) but model_index.json sets requires_aesthetics_score: remove it"
    elif passed - expected == per_id:
        fix = "it takes 5 time ids (a refiner) but model_index.json lacks requires_aesthetics_score: true"
    else:
        fix = "unet/config.json and text_encoder_2's projection do not belong together; re-export the model"
    raise BundleError(f"{where}: the UNet's added embedding takes {expected} features, {time_ids} time ids x "
                      f"{per_id} + {pooled_dim} pooled give {passed}: {fix}")
