"""The LCM UNet's row of the exporter's component table, and the generation defaults an LCM bundle records.

A Latent Consistency Model's UNet (Luo et al. 2023) is SD's with ``time_cond_proj_dim`` set: it takes one more input,
``timestep_cond`` (B, time_cond_proj_dim), the guidance-scale embedding (w-embedding) that its distillation
conditioned it on, added to the timestep features through a bias-free linear layer. The input name and axes are
optimum's (UNetOnnxConfig adds ``timestep_cond`` when the config has time_cond_proj_dim), so either kind of bundle
reads the same way. The runtime computes the embedding (runtime/families/lcm.py).
"""
from __future__ import annotations

from edgediff.bundle.manifest import GenerationDefaults

from .components import ComponentExport, Geometry

# diffusers' LatentConsistencyModelPipeline defaults: 4 steps, guidance_scale 8.5 (w = 7.5 in the embedding)
LCM_STEPS = 4
LCM_GUIDANCE = 8.5


def takes_timestep_cond(unet_config: dict) -> bool:
    """True for a UNet distilled with a guidance embedding (LCM): its config sets time_cond_proj_dim."""
    return bool(unet_config.get("time_cond_proj_dim"))


def lcm_unet_row() -> dict[str, ComponentExport]:
    import torch

    class LcmUNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
            return self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                          return_dict=False)[0]

    def inputs(c, g: Geometry, gen):
        cfg = c["unet"].config
        w = torch.rand(g.batch, generator=gen) * 15.0  # w = guidance - 1, LCM's useful range is about 0..15
        return (
            torch.randn(g.batch, cfg.in_channels, g.latent_h, g.latent_w, generator=gen),
            torch.rand(g.batch, generator=gen) * 999.0,  # (B,) float32 timesteps
            torch.randn(g.batch, g.seq, cfg.cross_attention_dim, generator=gen),
            _embedding(w, cfg.time_cond_proj_dim),  # (B, time_cond_proj_dim) float32: real w-embeddings
        )

    return {"unet": ComponentExport(
        "unet", ("sample", "timestep", "encoder_hidden_states", "timestep_cond"), ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "timestep_cond": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
        lambda c: LcmUNet(c["unet"]), inputs,
    )}


def _embedding(w, dim: int):
    """Sinusoidal features of 1000 w, as the runtime computes them (runtime/families/lcm.py), in torch."""
    import math

    import torch

    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / (half - 1))).float()
    angles = (w * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def recommended_defaults(family: str, given: GenerationDefaults) -> GenerationDefaults:
    """What an exported bundle records as its defaults: the ones given (export --default-steps/--default-guidance),
    and for an LCM bundle, LatentConsistencyModelPipeline's where none was given — 25 steps would waste 21 of them."""
    if family != "lcm":
        return given
    return GenerationDefaults(steps=LCM_STEPS if given.steps is None else given.steps,
                              guidance_scale=LCM_GUIDANCE if given.guidance_scale is None else given.guidance_scale)
