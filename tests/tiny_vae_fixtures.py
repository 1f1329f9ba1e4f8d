"""A tiny random diffusers AutoencoderTiny that fits the tiny SD1 fixture (4 latent channels, 2 pixels per latent
cell), and the tiny SD1 pipeline exported with it (``--tiny-vae``), built once per test session however many test
modules ask."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCALING = 0.7  # not TAESD's 1.0, so the tests see that the config's scaling_factor is read and applied


def build_tiny_autoencoder(out: Path, *, seed: int = 0, **config) -> Path:
    """An AutoencoderTiny with random weights saved as a diffusers folder (config.json + safetensors)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    kw = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
              num_decoder_blocks=(1, 1), latent_channels=4, scaling_factor=SCALING)
    AutoencoderTiny(**{**kw, **config}).save_pretrained(out, safe_serialization=True)
    return Path(out)


@dataclass(frozen=True)
class Built:
    taesd: Path  # the AutoencoderTiny folder
    bundle: Path  # the tiny SD1 source exported with --tiny-vae taesd


_built: dict[str, Built] = {}


def tiny_sd1_with_taesd(source: Path, tmp_path_factory) -> Built:
    if "sd1" not in _built:
        from edgediff.export.pipeline_export import export_pipeline

        taesd = build_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd")
        bundle = export_pipeline(source, tmp_path_factory.mktemp("bundles") / "tiny-sd1-taesd", tiny_vae=taesd)
        _built["sd1"] = Built(taesd, bundle)
    return _built["sd1"]
