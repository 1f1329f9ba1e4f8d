"""Tiny random ControlNets for the tiny SD1 pipeline (tests/conftest.py's tiny_sd1_source): diffusers'
``ControlNetModel.from_unet`` on its UNet, with a conditioning embedding of two levels (the tiny VAE maps a latent
cell to 2x2 pixels) and its zero-initialised output convolutions filled with random values, so every residual
really changes the UNet's output (a fresh ControlNet's residuals are all zero and would prove nothing)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def build_tiny_controlnet(source: Path, out: Path, seed: int, *, global_pool: bool = False,
                          channel_order: str = "rgb") -> Path:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16),
                                    controlnet_conditioning_channel_order=channel_order)
    if global_pool:
        net.register_to_config(global_pool_conditions=True)
    with torch.no_grad():  # the zero convolutions (and the rest, so two nets differ) made random
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    net.save_pretrained(out, safe_serialization=True)
    return Path(out)


@dataclass(frozen=True)
class Built:
    source: Path  # the tiny SD1 pipeline folder
    nets: dict  # name -> ControlNetModel folder
    bundle: Path  # exported with every net of ``nets``


_built: dict[str, Built] = {}


def tiny_controlnet_bundle(tmp_path_factory, source: Path) -> Built:
    """The tiny SD1 pipeline exported with three tiny ControlNets, built once per test session: ``canny`` and
    ``depth`` (random, different seeds; ``depth`` reads BGR) and ``pool`` (global_pool_conditions, shuffle-style)."""
    if "sd1" not in _built:
        from edgediff.export.pipeline_export import export_pipeline

        root = tmp_path_factory.mktemp("controlnets")
        nets = {"canny": build_tiny_controlnet(source, root / "canny", 1),
                "depth": build_tiny_controlnet(source, root / "depth", 2, channel_order="bgr"),
                "pool": build_tiny_controlnet(source, root / "pool", 3, global_pool=True)}
        bundle = export_pipeline(source, tmp_path_factory.mktemp("bundles") / "tiny-sd1-controlnet",
                                 controlnets=[(folder, name) for name, folder in nets.items()])
        _built["sd1"] = Built(source, nets, bundle)
    return _built["sd1"]


def tiny_sdxl_controlnet_bundle(tmp_path_factory, source: Path) -> Built:
    """The tiny SDXL base pipeline (tests/sdxl_fixtures.py) exported with one tiny SDXL ControlNet ``edges``
    (ControlNetModel.from_unet on its UNet: text_time additional embeddings), built once per test session."""
    if "sdxl" not in _built:
        from edgediff.export.pipeline_export import export_pipeline

        root = tmp_path_factory.mktemp("sdxl-controlnets")
        nets = {"edges": build_tiny_controlnet(source, root / "edges", 4)}
        bundle = export_pipeline(source, tmp_path_factory.mktemp("bundles") / "tiny-sdxl-controlnet",
                                 controlnets=[(folder, name) for name, folder in nets.items()])
        _built["sdxl"] = Built(source, nets, bundle)
    return _built["sdxl"]
