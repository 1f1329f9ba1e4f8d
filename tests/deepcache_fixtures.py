"""DeepCache test helpers: the reference implementation (pip ``DeepCache==0.1.1``, ``DeepCacheSDHelper``) driving a
diffusers UNet or pipeline, and a tiny random UNet with SD's two layers per block (the conftest's tiny-sd1 UNet has
one), so both layer counts are checked."""
from __future__ import annotations

import types
from contextlib import contextmanager


@contextmanager
def deepcache_helper(pipe, interval: int, branch: int):
    """DeepCacheSDHelper enabled on ``pipe`` (anything with ``.unet`` and ``.scheduler.timesteps``), then disabled:
    its cached outputs and start step are the reference's state for one call."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield helper
    finally:
        helper.disable()


def unet_driver(unet, timesteps):
    """The minimal pipe the helper reads: the UNet and the scheduler's timesteps (it looks each call's timestep up)."""
    import torch

    return types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(timesteps=torch.tensor(timesteps)))


def tiny_unet_lpb2(seed: int = 0):
    """A random 3-block UNet with SD 1.x's block types and two layers per block (9 DeepCache branches)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    unet.set_default_attn_processor()
    unet.requires_grad_(False)
    return unet
