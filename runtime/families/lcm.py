"""Latent Consistency Model conditioning (Luo et al. 2023, "Latent Consistency Models"): SD's text conditioning plus
the guidance-scale embedding the distilled UNet takes as ``timestep_cond``.

LCM distillation bakes classifier-free guidance into the model: the consistency function is conditioned on the
guidance scale w (Luo et al. 2023, Sec. 4.2 and Algorithm 1, f_theta(z, w, c, t)), fed as an embedding of w the way
Meng et al. 2023 ("On Distillation of Guided Diffusion Models", CVPR) condition their distilled student. So there
is no unconditional branch: one UNet batch per step, ``guidance_scale`` only sets w, and a negative prompt has
nothing to act on (diffusers' LatentConsistencyModelPipeline takes none).

The embedding is diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding (VDM's sinusoidal timestep
features, Kingma et al. 2021): with w = guidance_scale - 1 (the Imagen CFG convention of StableDiffusionPipeline,
so guidance 1 means w = 0) and d = time_cond_proj_dim, half = d // 2,

    freq_k = exp(-k ln(10000) / (half - 1)),  k = 0 .. half - 1
    emb(w) = [sin(1000 w freq_k) ..., cos(1000 w freq_k) ...]  (+ one zero when d is odd)
"""
from __future__ import annotations

import math

import numpy as np

from ..bundle.reader import Bundle
from ..components import Components
from ..conditioning import Conditioning
from ..errors import BundleError, InputError
from ..request import GenerationRequest
from ..timing import Stopwatch
from .sd import SdTextConditioner

TIMESTEP_COND = "timestep_cond"  # the UNet input (optimum's name; export/components_lcm.py)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """(N, dim) float32 w-embedding of (N,) guidance weights w, as torch computes it in float32: the frequencies
    and products are rounded to float32 where torch rounds them, and each transcendental is evaluated in float64
    and rounded once (torch's float32 kernels are accurate to about an ulp; float32 numpy ones differ from them by
    more once 1000 w multiplies the frequency)."""
    if dim < 4:
        raise BundleError(f"time_cond_proj_dim {dim}: the guidance embedding needs at least 4 features")
    half = dim // 2
    step = np.float32(np.float32(math.log(10000.0)) / np.float32(half - 1))  # torch.log(tensor(10000.)) / (half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step, dtype=np.float64).astype(np.float32)  # (half,)
    angles = (np.asarray(w, np.float32) * np.float32(1000.0))[:, None] * freqs[None, :]  # (N, half) float32
    emb = np.concatenate([np.sin(angles.astype(np.float64)), np.cos(angles.astype(np.float64))], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def check_guidance_input(bundle: Bundle) -> None:
    """A UNet that takes ``timestep_cond`` in a bundle of another family (optimum's export of an LCM-distilled SDXL
    is described as sdxl) would be run without it: refuse it when the bundle is opened, naming what to do."""
    family = bundle.manifest.family
    if family == "lcm" or not bundle.has("unet"):
        return
    if any(s.name == TIMESTEP_COND for s in bundle.component("unet").inputs):
        raise BundleError(f"{bundle.root}: this {family} bundle's unet takes {TIMESTEP_COND!r}, a guidance embedding "
                          f"(an LCM-distilled UNet), which the runtime does not give a {family} model; LCMs distilled "
                          "from SD 1.x/2.x run as family lcm (re-export with edgediff export), LCM-distilled SDXL is "
                          "not supported yet (use SDXL with an LCM-LoRA and --preset lcm)")


class LcmTextConditioner(SdTextConditioner):
    """SD 1.x/2.x text conditioning (prompts, long and weighted prompts) plus the w-embedding in
    ``Conditioning.extra["timestep_cond"]``, one row per image."""

    options: frozenset[str] = frozenset()
    classifier_free_guidance = False  # guidance_scale is the model's w input, never a second UNet batch

    def __init__(self, bundle: Bundle):
        super().__init__(bundle)
        unet = bundle.component("unet")
        if not any(s.name == TIMESTEP_COND for s in unet.inputs):
            raise BundleError(f"{bundle.root}: this lcm bundle's unet has no {TIMESTEP_COND!r} input (the guidance "
                              "embedding); re-export it from the LCM pipeline with edgediff export")
        shape = unet.input(TIMESTEP_COND).shape
        dim = shape[-1] if len(shape) == 2 and isinstance(shape[-1], int) else bundle.unet_config.get("time_cond_proj_dim")
        if not isinstance(dim, int) or dim < 4:
            raise BundleError(f"{bundle.root}: the unet's {TIMESTEP_COND} input has shape {list(shape)} and "
                              f"unet/config.json time_cond_proj_dim is {dim!r}; re-export the bundle")
        self.embedding_dim = dim

    def prepare(self, options: dict, *, img2img: bool) -> dict:
        return {}

    # img2img as LatentConsistencyModelImg2ImgPipeline: every step runs, on timesteps picked inside the part of the
    # distillation schedule that `strength` keeps (LCMScheduler.set_timesteps(strength=...)), not by skipping the
    # first steps of the whole schedule as SD's img2img does
    def img2img_schedule(self, scheduler, strength: float) -> dict:
        if scheduler.name != "lcm":  # diffusers passes strength to the scheduler, which only LCMScheduler takes
            raise InputError(f"img2img with an lcm bundle runs the lcm scheduler (its timesteps depend on strength), "
                             f"not {scheduler.name}: drop scheduler=/--scheduler")
        return {"strength": strength}

    def img2img_steps(self, steps: int, strength: float) -> int:
        return steps

    def __call__(self, request: GenerationRequest, components: Components, watch: Stopwatch) -> Conditioning:
        cond = super().__call__(request, components, watch)  # unguided: (N, seq, D), one row per image
        w = np.full((request.total_images,), request.guidance_scale - 1.0, np.float32)  # (N,) float32
        extra = {**cond.extra, TIMESTEP_COND: guidance_embedding(w, self.embedding_dim)}  # (N, dim) float32
        return Conditioning(encoder_hidden_states=cond.encoder_hidden_states, guided=False, extra=extra)
