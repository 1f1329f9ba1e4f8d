"""The denoiser activation estimate behind the one-line "needs about N GiB" refusal: attention is counted where the
UNet has it (per level, diffusers' head counts), so SDXL's attention-free first level is not charged a full-grid
score matrix (at 1024x1024 with guidance that wrongly refused with "needs about 40.4 GiB")."""
from __future__ import annotations

import pytest

from edgediff import validation
from edgediff.errors import InputError

SD15 = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
SD21 = dict(attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
SDXL = dict(attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])
GiB = 2**30


@pytest.mark.parametrize("config, heads", [(SD15, [8, 8, 8, 8]), (SD21, [5, 10, 20, 20]), (SDXL, [None, 10, 20]),
                                           (dict(SD15, num_attention_heads=4), [4, 4, 4, 4]),
                                           (dict(SD15, mid_block_type=None), [8, 8, 8, 8]), ({}, [8, 8, 8, 8])])
def test_heads_per_level_follow_diffusers(config, heads):
    assert validation.unet_attention_heads(config) == heads  # the mid block's attention fills the last level


def test_sdxl_is_charged_its_largest_real_score_matrix():
    need = validation.activation_bytes(batch=2, latent_h=128, latent_w=128, attention_heads=[None, 10, 20],
                                       channels=SDXL["block_out_channels"])
    level1 = 2 * 10 * (64 * 64) ** 2 * 4  # (batch, heads, tokens, tokens) float32 at 64x64 latents: 1.25 GiB
    full_grid = 2 * 20 * (128 * 128) ** 2 * 4  # what the old estimate charged: 40 GiB
    assert level1 < need < level1 + 0.5 * GiB and need < full_grid / 20


def test_one_count_is_attention_over_the_full_grid_as_before():
    kw = dict(batch=2, latent_h=64, latent_w=64, channels=SD15["block_out_channels"])
    assert validation.activation_bytes(attention_heads=8, **kw) == \
        validation.activation_bytes(attention_heads=validation.unet_attention_heads(SD15), **kw)
    assert validation.activation_bytes(attention_heads=[None, None], **kw) < GiB // 8  # feature maps only


def test_tiny_sdxl_request_is_checked_per_level(tiny_sdxl_base, monkeypatch):
    """The tiny SDXL UNet has attention only at its second level (2 and 4 heads; VAE factor 2): with 16 MiB free,
    64x64 (32x32 latents, 256 tokens at level 1: 2 MiB of scores) is taken; at 256x256 (4096 tokens at level 1:
    512 MiB) it is refused in one line before any work. Charged over the full grid, 64x64 would need 32 MiB."""
    from edgediff.pipeline import Pipeline

    monkeypatch.setattr(validation, "available_memory", lambda: 16 << 20)
    with Pipeline.load(tiny_sdxl_base.bundle) as pipe:
        pipe.request("x", height=64, width=64)
        with pytest.raises(InputError, match=r"256x256 with batch 2 needs about 0\.5 GiB for the denoiser's "
                                             r"activations; 0\.0 GiB is available"):
            pipe.request("x", height=256, width=256)
