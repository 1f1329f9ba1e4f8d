"""One generation request: every argument of a call, validated and resolved before any work.

``Pipeline.__call__`` builds it from diffusers' keyword names (``Pipeline.request``); the denoising code reads it and
nothing else, so the same frozen object can be queued, logged, batched by a server and replayed. Callbacks and
cancellation are not part of it: they are how one caller watches its own call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .noise import NoiseSource


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[str, ...]  # one entry per prompt
    negatives: tuple[str, ...] | None  # one per prompt when guided; None when guidance is off
    steps: int  # denoising steps of the whole schedule (img2img runs the last ``strength`` part of it)
    guidance_scale: float  # > 1: classifier-free guidance, two denoiser batches per step
    height: int  # pixels, a multiple of the bundle's size_multiple
    width: int
    images_per_prompt: int
    seeds: tuple[int, ...]  # one per image, prompt-major: seeds[p * images_per_prompt + k]
    noise: NoiseSource  # every random draw of the call comes from here, one stream per image
    scheduler: str  # a name of edgediff.schedulers.SCHEDULERS
    output_type: str = "pil"  # "pil" | "np" | "latent" (the denoised latents, not decoded)
    latents: np.ndarray | None = None  # (N, C, H/f, W/f) float32 initial latents (txt2img only)
    init_image: np.ndarray | None = None  # (1, 3, H, W) float32 in [-1, 1] (img2img)
    init_latents: np.ndarray | None = None  # (1 or N, C, H/f, W/f) float32: img2img from latents (SDXL refiner)
    strength: float | None = None  # img2img only: the fraction of the schedule that is run
    negative_given: bool = True  # False: no negative prompt was given (SDXL then uses zero embeddings)
    denoising_start: float | None = None  # (0, 1): skip the schedule's first part (an ensemble of experts' 2nd)
    denoising_end: float | None = None  # (0, 1): stop there and hand the latents on (output_type="latent")
    rng: str = "numpy"  # the noise kind by name ("custom" for a caller's NoiseSource), for the record
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific options (SDXL's micro-conditioning, ...)
    inpaint: Any = None  # runtime/inpaint.InpaintInputs: mask_image= (init image and mask, preprocessed)
    cfg_cutoff: float | None = None  # [0, 1]: guidance stops after this fraction of the steps (runtime/cfg_cutoff.py)
    decoder: str = "full"  # "full": the VAE decoder; "tiny": the bundle's vae_decoder_tiny (runtime/tiny_vae.py)
    vae_tiling: bool | None = None  # None: tile the VAE when it would not fit in memory; True/False: always/never
    vae_tile_size: int | None = None  # tiled VAE's tile in pixels (None: the VAE config's sample_size, diffusers')
    cache_interval: int | None = None  # DeepCache: full UNet every N-th step, shallow between (runtime/deepcache.py)
    cache_branch: int = 0  # DeepCache's cache_branch_id: which skip branch's feature is cached
    cache_schedule: str = "uniform"  # DeepCache's full steps: "uniform" (every N-th) or "quadratic" (paper Sec. 3.3)
    cache_center: int | None = None  # quadratic only: the step the full steps crowd around
    cache_pow: float | None = None  # quadratic only: the power law's exponent (> 1)
    controlnet: Any = None  # runtime/controlnet.ControlInputs: control_image= (ControlNets, preprocessed images)

    @property
    def guided(self) -> bool:
        return self.negatives is not None

    @property
    def img2img(self) -> bool:
        return self.init_image is not None or self.init_latents is not None

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def denoiser_batch(self) -> int:
        return self.total_images * (2 if self.guided else 1)
