"""What each bundle component is in PyTorch: the module wrapper, its ONNX I/O names and dynamic axes, and random
inputs for tracing and parity checks. One table, used by the exporter and the parity check alike.

Names follow optimum's ONNX Stable Diffusion export so that both kinds of bundle read the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgediff.bundle.derived import vae_scale_factor


@dataclass(frozen=True)
class Geometry:
    """Shapes to trace or check with: batch, latent height/width, token length."""

    batch: int
    latent_h: int
    latent_w: int
    seq: int


@dataclass(frozen=True)
class ComponentExport:
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    wrap: Callable[[Any], Any]  # pipeline components -> torch.nn.Module with positional inputs
    inputs: Callable[[Any, Geometry, Any], tuple]  # (components, geometry, torch.Generator) -> example inputs


def _modules():
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids.long(), return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class UNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        # Exports the diagonal Gaussian's parameters (mean, logvar), not a sample: the runtime draws the sample
        # with its own explicit generator, exactly as diffusers' latent_dist.sample(generator) does.
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample):
            return self.m.encode(sample, return_dict=True).latent_dist.parameters

    return TextEncoder, UNet, VaeDecoder, VaeEncoder


def table() -> dict[str, ComponentExport]:
    import torch

    TextEncoder, UNet, VaeDecoder, VaeEncoder = _modules()

    def text_inputs(c, g: Geometry, gen):
        vocab = c["text_encoder"].config.vocab_size
        return (torch.randint(0, vocab, (g.batch, g.seq), generator=gen, dtype=torch.int32),)

    def unet_inputs(c, g: Geometry, gen):
        unet = c["unet"]
        return (
            torch.randn(g.batch, unet.config.in_channels, g.latent_h, g.latent_w, generator=gen),
            torch.rand(g.batch, generator=gen) * 999.0,  # (B,) float32 timesteps
            torch.randn(g.batch, g.seq, unet.config.cross_attention_dim, generator=gen),
        )

    def dec_inputs(c, g: Geometry, gen):
        return (torch.randn(g.batch, c["vae"].config.latent_channels, g.latent_h, g.latent_w, generator=gen),)

    def enc_inputs(c, g: Geometry, gen):
        f = vae_scale_factor(c["vae"].config.block_out_channels)
        return (torch.rand(g.batch, 3, g.latent_h * f, g.latent_w * f, generator=gen) * 2 - 1,)

    return {
        "text_encoder": ComponentExport(
            "text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output"),
            {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
             "pooler_output": {0: "batch"}},
            lambda c: TextEncoder(c["text_encoder"]), text_inputs,
        ),
        "unet": ComponentExport(
            "unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",),
            {
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "sequence"},
                "out_sample": {0: "batch", 2: "height", 3: "width"},
            },
            lambda c: UNet(c["unet"]), unet_inputs,
        ),
        "vae_decoder": ComponentExport(
            "vae_decoder", ("latent_sample",), ("sample",),
            {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "image_height", 3: "image_width"}},
            lambda c: VaeDecoder(c["vae"]), dec_inputs,
        ),
        "vae_encoder": ComponentExport(
            "vae_encoder", ("sample",), ("latent_parameters",),
            {"sample": {0: "batch", 2: "image_height", 3: "image_width"}, "latent_parameters": {0: "batch", 2: "height", 3: "width"}},
            lambda c: VaeEncoder(c["vae"]), enc_inputs,
        ),
    }
