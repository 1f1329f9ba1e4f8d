"""The tiny autoencoder's rows of the exporter's component table: ``edgediff export SRC OUT --tiny-vae TAESD_DIR``
adds a diffusers ``AutoencoderTiny`` (TAESD, TAESDXL, ...) to the bundle as ``vae_decoder_tiny`` and
``vae_encoder_tiny``, next to the VAE, for fast decodes and step previews (runtime/tiny_vae.py).

The graphs hold the networks only (``AutoencoderTiny.decode`` / ``encode``: latents in, pixels in [-1, 1] out, and
back), with the VAE rows' I/O names; the runtime applies the config's ``scaling_factor`` as diffusers' pipelines do.
The folder is checked against the source's VAE before anything is loaded: the same latent channels and the same
pixels per latent cell, or the tiny decoder would read latents it was not trained on.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgediff.bundle.derived import vae_scale_factor
from edgediff.config import read_json
from edgediff.errors import ConfigError, ExportError

from .components import ComponentExport, Geometry
from .source import weights_pickled

TINY_FOLDER = "vae_tiny"  # the source model the tiny rows are traced from (plan.MODULE_OF / MODEL_CLASSES)
TINY_CLASS = "AutoencoderTiny"


def tiny_factors(cfg: dict) -> tuple[int, int]:
    """(decoder, encoder) pixels per latent cell of an AutoencoderTiny config: the decoder upsamples by
    ``upsampling_scaling_factor`` between its blocks, the encoder halves with a stride-2 conv between its blocks."""
    dec = cfg.get("decoder_block_out_channels", (64, 64, 64, 64))
    enc = cfg.get("encoder_block_out_channels", (64, 64, 64, 64))
    up = cfg.get("upsampling_scaling_factor", 2)
    return int(up) ** (len(dec) - 1), 2 ** (len(enc) - 1)


def with_tiny_vae(source, folder: str | Path, vae_config: dict, *, allow_pickle: bool = False):
    """``source`` (export/source.py Source) with the AutoencoderTiny folder ``folder`` checked against the VAE's
    config ``vae_config`` and attached; raises ExportError with one line naming what does not fit."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ExportError(f"--tiny-vae {root}: not a folder; give a diffusers AutoencoderTiny folder (config.json + "
                          "diffusion_pytorch_model.safetensors, e.g. madebyollin/taesd)")
    try:
        cfg = read_json(root / "config.json", what="--tiny-vae config.json")
    except ConfigError as exc:
        raise ExportError(f"--tiny-vae {root}: {exc}") from None
    if cfg.get("_class_name") != TINY_CLASS:
        raise ExportError(f"--tiny-vae {root} holds a {cfg.get('_class_name')!r}, not a diffusers {TINY_CLASS}")
    want_c, got_c = int(vae_config.get("latent_channels", 4)), cfg.get("latent_channels", 4)
    if got_c != want_c:
        raise ExportError(f"--tiny-vae {root} has {got_c} latent channels and the pipeline's VAE {want_c}: it was "
                          "made for another model family (TAESD for SD 1.x/2.x, TAESDXL for SDXL)")
    f = vae_scale_factor(vae_config.get("block_out_channels", [0]))
    dec, enc = tiny_factors(cfg)
    if (dec, enc) != (f, f):
        raise ExportError(f"--tiny-vae {root} maps a latent cell to {dec}x{dec} pixels (encoder {enc}x{enc}) and the "
                          f"pipeline's VAE to {f}x{f}: it does not fit this model")
    pickled = weights_pickled(root, allow_pickle=allow_pickle, what=f"--tiny-vae {root}")
    return replace(source, tiny_vae=root,
                   pickle_components=source.pickle_components + ((TINY_FOLDER,) if pickled else ()))


def _modules():
    import torch

    class TinyDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]

    class TinyEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample):
            return self.m.encode(sample, return_dict=False)[0]  # (B, C, h, w) latents, unscaled

    return TinyDecoder, TinyEncoder


def tiny_vae_rows() -> dict[str, ComponentExport]:
    import torch

    TinyDecoder, TinyEncoder = _modules()

    def dec_inputs(c, g: Geometry, gen):
        cfg = c[TINY_FOLDER].config
        return (torch.randn(g.batch, cfg.latent_channels, g.latent_h, g.latent_w, generator=gen),)

    def enc_inputs(c, g: Geometry, gen):
        _, f = tiny_factors(dict(c[TINY_FOLDER].config))
        return (torch.rand(g.batch, 3, g.latent_h * f, g.latent_w * f, generator=gen) * 2 - 1,)

    return {
        "vae_decoder_tiny": ComponentExport(
            "vae_decoder_tiny", ("latent_sample",), ("sample",),
            {"latent_sample": {0: "batch", 2: "height", 3: "width"},
             "sample": {0: "batch", 2: "image_height", 3: "image_width"}},
            lambda c: TinyDecoder(c[TINY_FOLDER]), dec_inputs,
        ),
        "vae_encoder_tiny": ComponentExport(
            "vae_encoder_tiny", ("sample",), ("latents",),
            {"sample": {0: "batch", 2: "image_height", 3: "image_width"},
             "latents": {0: "batch", 2: "height", 3: "width"}},
            lambda c: TinyEncoder(c[TINY_FOLDER]), enc_inputs,
        ),
    }
