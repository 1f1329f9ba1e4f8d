"""Values derived from a model's configs, computed in one place for the exporter, the runtime and the engines."""
from __future__ import annotations

from typing import Sequence


def latent_multiple(vae_scale_factor: int, unet_block_out_channels: Sequence[int]) -> int:
    """The multiple image sides must have: the VAE downsamples by ``vae_scale_factor`` and the exported UNet
    then halves the latent grid once per extra level (upsampling by fixed factors back), so each latent side must
    divide by ``2 ** (levels - 1)``."""
    levels = max(1, len(unet_block_out_channels))
    return int(vae_scale_factor) * 2 ** (levels - 1)


def vae_scale_factor(vae_block_out_channels: Sequence[int]) -> int:
    """Pixels per latent cell: the VAE halves the image once per level after the first (diffusers'
    ``2 ** (len(vae.config.block_out_channels) - 1)``)."""
    return 2 ** (max(1, len(vae_block_out_channels)) - 1)
