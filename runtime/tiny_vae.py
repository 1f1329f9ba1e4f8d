"""The tiny autoencoder (TAESD-style diffusers ``AutoencoderTiny``), exported into a bundle as ``vae_decoder_tiny``
(and ``vae_encoder_tiny``) by ``edgediff export SRC OUT --tiny-vae TAESD_DIR``: a decoder some 20x cheaper than the
VAE's, for fast final images (``decoder="tiny"``) and for previews during the steps (``Pipeline.preview``).

Conventions are diffusers' with ``pipe.vae = AutoencoderTiny(...)``: the pipeline decodes
``vae.decode(latents / vae.config.scaling_factor)`` (TAESD's scaling_factor is 1.0: it reads the denoiser's latents
as they are) and ``DecoderTiny`` returns pixels in [-1, 1] (it maps its [0, 1] output with ``x * 2 - 1``), so the
image is post-processed like the VAE's. The graphs hold only the networks; scaling stays here, as for the VAE.
(``scale_latents`` / ``unscale_latents`` with latent_magnitude and latent_shift are AutoencoderTiny's uint8 storage
format for latents, used by its ``forward`` round trip only; no pipeline decodes through them.)
"""
from __future__ import annotations

import numpy as np

from . import images as img
from .bundle import layout
from .errors import BundleError, InputError
from .stages import run_component

TINY_DECODER = "vae_decoder_tiny"
TINY_ENCODER = "vae_encoder_tiny"
DECODERS = ("full", "tiny")


def check_decoder(bundle, decoder) -> str:
    """``"full"`` (the VAE) or ``"tiny"``, which needs the bundle's vae_decoder_tiny."""
    if decoder not in DECODERS:
        raise InputError(f"decoder={decoder!r}; expected one of {list(DECODERS)}")
    if decoder == "tiny" and not bundle.has(TINY_DECODER):
        raise InputError(f"decoder='tiny' needs a tiny autoencoder in the bundle, and {bundle.root} has no "
                         f"{TINY_DECODER}: re-export it with edgediff export SRC OUT --tiny-vae TAESD_DIR")
    return decoder


def latent_transform(bundle) -> tuple[np.float32, np.float32]:
    """(scaling_factor, shift_factor) of the tiny autoencoder's config: decode reads latents / scaling + shift."""
    cfg = bundle.config(layout.config_path(TINY_DECODER))
    scale, shift = cfg.get("scaling_factor", 1.0), cfg.get("shift_factor", 0.0) or 0.0
    for name, v in (("scaling_factor", scale), ("shift_factor", shift)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (
                name == "scaling_factor" and v == 0):
            raise BundleError(f"{bundle.root}/{layout.config_path(TINY_DECODER)}: {name} {v!r} is not a usable "
                             "number; re-export the bundle")
    return np.float32(scale), np.float32(shift)


def decode(components, bundle, latents: np.ndarray) -> np.ndarray:
    """Denoiser latents (N, C, h, w) -> (N, 3, H, W) float32 in [-1, 1] through vae_decoder_tiny."""
    scale, shift = latent_transform(bundle)
    z = np.ascontiguousarray(latents / scale + shift, dtype=np.float32)
    with components.use(TINY_DECODER) as dec:
        return run_component(dec, {"latent_sample": z}, precision=bundle.component(TINY_DECODER).precision)[0]


def preview(components, bundle, latents) -> list:
    """PIL images of ``latents`` (a step callback's (N, C, h, w) array) through the tiny decoder."""
    from PIL import Image

    check_decoder(bundle, "tiny")
    x = np.asarray(latents)
    m = bundle.manifest
    if x.ndim != 4 or x.shape[1] != m.latent_channels or not np.issubdtype(x.dtype, np.floating) or not x.size:
        raise InputError(f"preview takes latents of shape (N, {m.latent_channels}, h, w), floating point (what a "
                         f"step callback receives), not {x.dtype} {x.shape}")
    return [Image.fromarray(a) for a in img.to_uint8(decode(components, bundle, x))]
