"""Argument checks for a generation call: each bad value is one InputError line saying what is allowed."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

MAX_PROMPT_CHARS = 10_000  # CLIP reads 77 tokens (~300 characters); refuse absurd inputs before tokenizing them
MAX_IMAGES = 64
OUTPUT_TYPES = ("pil", "np", "latent")


def prompts(value, *, what: str = "prompt") -> list[str]:
    """str or list of str -> list of str. An empty prompt is allowed: it asks for an unconditional image."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise InputError(f"{what} must be a string or a non-empty list of strings, not {type(value).__name__}")
    for p in items:
        if len(p) > MAX_PROMPT_CHARS:
            raise InputError(f"{what} has {len(p)} characters; the limit is {MAX_PROMPT_CHARS} (CLIP reads ~77 tokens)")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8 (a shell's \xff, a bad API string)
            raise InputError(f"{what} is not valid Unicode text (an undecodable byte at character {exc.start}); "
                             "pass UTF-8 text") from None
    return list(items)


def steps(n, *, max_steps: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"num_inference_steps must be an integer, not {type(n).__name__}")
    if not 1 <= n <= max_steps:
        raise InputError(f"num_inference_steps={n}; must be between 1 and {max_steps} (the model's training timesteps)")
    return n


def guidance(g) -> float:
    try:
        g = float(g)
    except (TypeError, ValueError):
        raise InputError(f"guidance_scale must be a number, not {g!r}") from None
    if not math.isfinite(g) or g < 0:
        raise InputError(f"guidance_scale={g}; must be a finite number >= 0 (values <= 1 turn guidance off)")
    return g


def strength(s) -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise InputError(f"strength must be a number, not {s!r}") from None
    if not (0.0 < s <= 1.0) or math.isnan(s):
        raise InputError(f"strength={s}; must be in (0, 1] (1 ignores the init image entirely)")
    return s


def flag(value, *, what: str) -> bool:
    """A boolean option: True or False only ("no" is a true string in Python; refuse it rather than guess)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{what} must be True or False, not {value!r}")
    return bool(value)


def hook(fn, *, what: str):
    """An optional callable (callback, cancel): None or something that can be called."""
    if fn is not None and not callable(fn):
        raise InputError(f"{what} must be callable (or None), not {type(fn).__name__}")
    return fn


def output_type(value) -> str:
    if value not in OUTPUT_TYPES:
        raise InputError(f"output_type={value!r}; expected one of {list(OUTPUT_TYPES)}")
    return value


def fraction(value, *, what: str) -> float | None:
    """None, or a number strictly between 0 and 1 (diffusers' denoising_start / denoising_end)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise InputError(f"{what}={value!r}; must be a number strictly between 0 and 1 (a fraction of the schedule)")
    return float(value)


def count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise InputError(f"num_images_per_prompt={n!r}; must be an integer between 1 and {MAX_IMAGES}")
    return n


def size(height, width, *, multiple: int, default: tuple[int, int]) -> tuple[int, int]:
    h = default[0] if height is None else height
    w = default[1] if width is None else width
    for name, v in (("height", h), ("width", w)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name}={v!r}; must be a positive integer")
        if v % multiple:
            lo = max(multiple, v - v % multiple)
            raise InputError(f"{name}={v} is not a multiple of {multiple} (this model's latent grid); try {lo} or {lo + multiple}")
    return h, w


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(*, batch: int, latent_h: int, latent_w: int, attention_heads: int | Sequence[int | None],
                     channels: Sequence[int]) -> int:
    """A deliberately rough upper estimate of the denoiser's activation memory: the largest self-attention score
    matrix (batch * heads * tokens^2 float32), which dominates at large sizes, plus a few feature maps per level.
    ``attention_heads``: one count for attention over the full latent grid (SD 1.x's first level, a transformer's
    patches), or one entry per UNet level (``None``: no attention there; level i sees (h*w) / 4^i tokens) -- SDXL's
    first level has none, so its largest matrix is at 1/4 of the tokens, 1/16 of the full-grid size."""
    hw = latent_h * latent_w
    levels = [attention_heads] if isinstance(attention_heads, int) else list(attention_heads)
    attention = max((batch * heads * (hw // 4 ** i) ** 2 * 4 for i, heads in enumerate(levels) if heads), default=0)
    features = sum(batch * c * hw // (4 ** i) * 4 * 6 for i, c in enumerate(channels))
    return attention + features


def unet_attention_heads(config: Mapping[str, Any]) -> list[int | None]:
    """Attention heads per level of a diffusers UNet2DConditionModel config (``None``: the level has no attention).
    diffusers reads ``attention_head_dim`` as the head count when ``num_attention_heads`` is unset (a historical
    misnaming it keeps), an int meaning every level; levels with attention are those whose down block type has
    "Attn" in its name, plus the mid block's at the lowest level."""
    types = list(config.get("down_block_types") or ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(types)
    levels: list[int | None] = [int(per_level[i]) if "Attn" in t and i < len(per_level) else None
                                for i, t in enumerate(types)]
    if levels and levels[-1] is None and "Attn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        levels[-1] = int(per_level[min(len(types), len(per_level)) - 1])
    return levels
