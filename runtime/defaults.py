"""The runtime's own generation defaults: one place, used when neither the call nor the bundle names a value.

A bundle may record the values its producer recommends (``edgediff export --default-steps/--default-guidance``,
``Manifest.defaults``); ``Bundle.default_steps`` / ``Bundle.default_guidance`` resolve the two in that order.
"""
from __future__ import annotations

DEFAULT_STEPS = 25  # diffusers' StableDiffusionPipeline uses 50; 25 with a multistep solver matches it closely
DEFAULT_GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default
# Families whose diffusers pipeline defaults to another scale (StableDiffusionXLPipeline: 5.0)
FAMILY_GUIDANCE = {"sdxl": 5.0, "sdxl-refiner": 5.0, "lcm": 8.5, "sd3": 7.0,
                  "flux": 3.5}  # ... and LatentConsistencyModelPipeline: 8.5; FluxPipeline: 3.5 (dev's guidance input)


def default_guidance(family: str) -> float:
    """The guidance scale diffusers' pipeline for ``family`` uses when a call names none."""
    return FAMILY_GUIDANCE.get(family, DEFAULT_GUIDANCE)
