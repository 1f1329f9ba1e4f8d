"""Latent Consistency Model pipelines with random weights (the LCM presets of ``random_pipeline``).

An LCM distilled from SD 1.5 (Luo et al. 2023, e.g. SimianLuo/LCM_Dreamshaper_v7) is SD 1.5's pipeline with two
differences, and these builders make exactly those: the UNet has ``time_cond_proj_dim`` (a bias-free linear layer
that adds the guidance-scale embedding w-embedding to the timestep features), and the scheduler is LCMScheduler. The
folder is saved as a LatentConsistencyModelPipeline.

    python -m edgediff.export.random_pipeline tiny-lcm /tmp/tiny-lcm     # the test fixture's shape
    python -m edgediff.export.random_pipeline lcm /tmp/lcm-random         # SD-1.5 layer sizes, for measuring speed
"""
from __future__ import annotations

import json
from pathlib import Path

LCM_PRESETS = ("tiny-lcm", "lcm")
# preset -> (the SD preset whose text encoder, VAE, tokenizer and UNet layout it shares, time_cond_proj_dim)
# 256 is LCM_Dreamshaper_v7's; the tiny one's 24 differs from every other tiny width (32, 64, 128), so a wrong
# embedding size changes a shape instead of passing silently.
_BASE = {"tiny-lcm": ("tiny-sd1", 24), "lcm": ("sd15", 256)}
# LCM_Dreamshaper_v7's scheduler_config.json (diffusers LCMScheduler arguments)
LCM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     original_inference_steps=50, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                     prediction_type="epsilon", timestep_scaling=10.0)


def build_lcm_pipeline(out: Path, preset: str, seed: int = 0) -> Path:
    """Write a diffusers LatentConsistencyModelPipeline folder (safetensors) with random weights to ``out``."""
    if preset not in LCM_PRESETS:
        raise ValueError(f"preset {preset!r}; expected one of {list(LCM_PRESETS)}")
    import torch
    from diffusers import LCMScheduler, UNet2DConditionModel

    from .random_pipeline import build_random_pipeline

    base, cond_dim = _BASE[preset]
    out = build_random_pipeline(Path(out), base, seed=seed)
    unet_config = {k: v for k, v in json.loads((out / "unet" / "config.json").read_text()).items()
                   if not k.startswith("_")}
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config({**unet_config, "time_cond_proj_dim": cond_dim})
    unet.save_pretrained(out / "unet", safe_serialization=True)
    del unet
    for stale in (out / "scheduler").iterdir():
        stale.unlink()
    LCMScheduler(**LCM_SCHEDULER).save_pretrained(out / "scheduler")
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
