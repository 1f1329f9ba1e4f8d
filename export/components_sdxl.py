"""SDXL's rows of the exporter's component table: two text towers that return the penultimate hidden state, and a
UNet that takes the pooled text embedding and the micro-conditioning time ids. The VAE rows are SD's.

Names follow optimum's SDXL ONNX export (CLIPTextOnnxConfig / CLIPTextWithProjectionOnnxConfig with
output_hidden_states, UNetOnnxConfig with ``text_embeds`` / ``time_ids``), so either kind of bundle reads the same
way. Of the hidden states optimum exports (``hidden_states.0`` ... ``hidden_states.<layers>``) we export the one
SDXL uses: diffusers' StableDiffusionXLPipeline.encode_prompt takes ``hidden_states[-2]`` of both towers (clip_skip
None), which is ``hidden_states.<layers - 1>``.
"""
from __future__ import annotations

from .components import ComponentExport, Geometry, table


def penultimate_name(num_hidden_layers: int) -> str:
    """hidden_states has layers + 1 entries (the embeddings, then each layer's output): [-2] is index layers - 1."""
    return f"hidden_states.{num_hidden_layers - 1}"


def _modules():
    import torch

    class ClipTower(torch.nn.Module):
        """CLIP ViT-L (CLIPTextModel): last_hidden_state, pooler_output, penultimate hidden state."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids.long(), output_hidden_states=True, return_dict=True)
            return out.last_hidden_state, out.pooler_output, out.hidden_states[-2]

    class ProjectionTower(torch.nn.Module):
        """OpenCLIP ViT-bigG (CLIPTextModelWithProjection): text_embeds, last_hidden_state, penultimate hidden state."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids.long(), output_hidden_states=True, return_dict=True)
            return out.text_embeds, out.last_hidden_state, out.hidden_states[-2]

    class SdxlUNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                          return_dict=False)[0]

    return ClipTower, ProjectionTower, SdxlUNet


def sdxl_table(text_layers: dict[str, int], time_ids: int) -> dict[str, ComponentExport]:
    """Rows for an SDXL pipeline. ``text_layers``: num_hidden_layers of each text encoder present (the refiner has
    only ``text_encoder_2``); ``time_ids``: 6 (original size, crop, target size) or 5 with requires_aesthetics_score
    (original size, crop, aesthetic score)."""
    import torch

    ClipTower, ProjectionTower, SdxlUNet = _modules()
    seq_axes = {0: "batch", 1: "sequence"}

    def text_inputs(name):
        def make(c, g: Geometry, gen):
            vocab = c[name].config.vocab_size
            return (torch.randint(0, vocab, (g.batch, g.seq), generator=gen, dtype=torch.int32),)
        return make

    def unet_inputs(c, g: Geometry, gen):
        cfg = c["unet"].config
        pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim * time_ids
        # time ids are pixel sizes / crop offsets (and a score near 6): values of the size SDXL sees
        ids = torch.randint(0, 1025, (g.batch, time_ids), generator=gen).float()
        return (
            torch.randn(g.batch, cfg.in_channels, g.latent_h, g.latent_w, generator=gen),
            torch.rand(g.batch, generator=gen) * 999.0,  # (B,) float32 timesteps
            torch.randn(g.batch, g.seq, cfg.cross_attention_dim, generator=gen),
            torch.randn(g.batch, pooled, generator=gen),  # (B, projection_dim) pooled OpenCLIP-G embedding
            ids,  # (B, 6 or 5) float32
        )

    rows: dict[str, ComponentExport] = {}
    if "text_encoder" in text_layers:
        hidden = penultimate_name(text_layers["text_encoder"])
        rows["text_encoder"] = ComponentExport(
            "text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output", hidden),
            {"input_ids": seq_axes, "last_hidden_state": seq_axes, "pooler_output": {0: "batch"}, hidden: seq_axes},
            lambda c: ClipTower(c["text_encoder"]), text_inputs("text_encoder"),
        )
    hidden = penultimate_name(text_layers["text_encoder_2"])
    rows["text_encoder_2"] = ComponentExport(
        "text_encoder_2", ("input_ids",), ("text_embeds", "last_hidden_state", hidden),
        {"input_ids": seq_axes, "text_embeds": {0: "batch"}, "last_hidden_state": seq_axes, hidden: seq_axes},
        lambda c: ProjectionTower(c["text_encoder_2"]), text_inputs("text_encoder_2"),
    )
    rows["unet"] = ComponentExport(
        "unet", ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": seq_axes,
            "text_embeds": {0: "batch"},
            "time_ids": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
        lambda c: SdxlUNet(c["unet"]), unet_inputs,
    )
    sd = table()
    rows["vae_decoder"], rows["vae_encoder"] = sd["vae_decoder"], sd["vae_encoder"]
    return rows
