"""FLUX.1's rows of the exporter's component table (diffusers ``FluxPipeline``: schnell and dev).

Components:

- ``text_encoder``: CLIP ViT-L (``CLIPTextModel``). FLUX reads only its pooled output (diffusers'
  FluxPipeline._get_clip_prompt_embeds takes ``pooler_output``), so that is the graph's one output.
- ``text_encoder_2``: T5 v1.1 encoder (``T5EncoderModel``): ``last_hidden_state`` over the padded
  ``max_sequence_length`` tokens (_get_t5_prompt_embeds: no attention mask, ``output_hidden_states=False``).
- ``transformer``: ``FluxTransformer2DModel`` inside ``FluxDenoiser`` (below).
- ``vae_decoder`` / ``vae_encoder``: SD's rows (a 16-channel AutoencoderKL; ``scaling_factor`` and ``shift_factor``
  are applied by the runtime, as for every family).

Where the latent packing and the position ids live: inside the exported transformer graph. FLUX's transformer
works on a sequence of 2x2 latent patches (FluxPipeline._pack_latents: (B, C, h, w) -> (B, h/2 * w/2, 4C)), with
rotary position ids per image token (row, column) and all-zero ids per text token (_prepare_latent_image_ids,
encode_prompt's ``text_ids``). Both are pure functions of the latent and text shapes, so ``FluxDenoiser`` computes
them from its inputs' shapes and unpacks its output again; the graph takes and returns (B, C, h, w) latents like a
UNet. Why there and not as numpy feeds or a step extension:

- the denoising loop, the schedulers (flow matching is elementwise: packing commutes with every update and with
  img2img's noising) and the initial noise stay exactly the runtime's: diffusers draws (B, 16, h, w) noise and packs
  it, so the same draw gives the same packed latents;
- every feed stays batch-aligned (rows = images): the ids are per-position, not per-image, and would break the
  server's step-level batching (which concatenates feeds along the batch) and the CFG cutoff (which halves them);
- packing is a reshape/transpose, free next to one transformer block.

The timestep feed is the scheduler's timestep (sigma * 1000) as the runtime feeds every denoiser; the graph divides
it by 1000 first, as FluxPipeline does before calling the transformer (which multiplies by 1000 again: the same
float32 arithmetic as diffusers). FLUX.1-dev's ``guidance`` input (transformer config ``guidance_embeds``) is the
distilled guidance strength (FluxPipeline passes ``guidance_scale`` itself, one per row), not classifier-free
guidance; schnell's graph has no such input.
"""
from __future__ import annotations

from typing import Any

from edgediff.errors import ExportError

from .components import ComponentExport, Geometry, table
from .t5 import T5_LIMIT, check_max_sequence_length, component_config, t5_encoder_module

SEQ_AXES = {0: "batch", 1: "sequence"}
LATENT_AXES = {0: "batch", 2: "height", 3: "width"}


def _modules():
    import torch

    class ExportableRMSNorm(torch.nn.RMSNorm):
        """torch.nn.RMSNorm (FLUX's q/k norms) with the same formula in ops the TorchScript ONNX exporter knows
        (opset 17 has no RMSNormalization; aten::rms_norm has no symbolic). Outside an export it is torch's own
        kernel, so the parity reference is diffusers' model unchanged."""

        def forward(self, x):
            if not torch.onnx.is_in_onnx_export():
                return super().forward(x)
            eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # F.rms_norm's default
            dims = tuple(range(-len(self.normalized_shape), 0))
            y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)  # Zhang & Sennrich 2019, eq. 4
            return y * self.weight if self.weight is not None else y

    def rotary_for_export(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        """diffusers.models.embeddings.apply_rotary_emb for FLUX's case (real cos/sin, pairs of adjacent channels,
        sequence on dim 1), written with ``unflatten``: the original's ``x.reshape(*x.shape[:-1], -1, 2)`` slices a
        torch.Size, which the TorchScript tracer records as constants, freezing batch and sequence in the graph."""
        if not (use_real and use_real_unbind_dim == -1 and sequence_dim == 1):
            raise ExportError(f"FLUX export: unexpected rotary embedding call (use_real={use_real}, "
                              f"use_real_unbind_dim={use_real_unbind_dim}, sequence_dim={sequence_dim})")
        cos, sin = freqs_cis  # (S, D) each
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)

    from diffusers.models.transformers import transformer_flux

    class ExportableAttnProcessor(transformer_flux.FluxAttnProcessor):
        """FluxAttnProcessor itself; while an ONNX export traces it, its rotary embedding is the trace-safe one
        above (swapped in for the duration of the call only: the export is single-threaded)."""

        def __call__(self, *args, **kwargs):
            if not torch.onnx.is_in_onnx_export():
                return super().__call__(*args, **kwargs)
            original = transformer_flux.apply_rotary_emb
            transformer_flux.apply_rotary_emb = rotary_for_export
            try:
                return super().__call__(*args, **kwargs)
            finally:
                transformer_flux.apply_rotary_emb = original

    def exportable(model):
        """The model with its RMSNorms and attention processors exporting as above (same parameters, same
        state-dict names; outside an export the same kernels as diffusers)."""
        for module in model.modules():
            if type(module) is torch.nn.RMSNorm:
                module.__class__ = ExportableRMSNorm
        processors = model.attn_processors
        if any(type(p) is not transformer_flux.FluxAttnProcessor for p in processors.values()):
            kinds = sorted({type(p).__name__ for p in processors.values()})
            raise ExportError(f"FLUX export: the transformer has attention processors {kinds}; expected diffusers' "
                              "FluxAttnProcessor (unload adapters such as IP-Adapter first)")
        model.set_attn_processor(ExportableAttnProcessor())
        return model

    class ClipPooled(torch.nn.Module):
        """CLIPTextModel: the pooled output only (what FLUX conditions on)."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids.long(), return_dict=True).pooler_output

    class FluxDenoiser(torch.nn.Module):
        """FluxTransformer2DModel on (B, C, h, w) latents: pack 2x2 patches, make the position ids, run, unpack."""

        def __init__(self, m):
            super().__init__()
            self.m = exportable(m)
            self.guided = bool(m.config.guidance_embeds)

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None):
            b, c, h, w = sample.shape
            h2, w2 = h // 2, w // 2
            # FluxPipeline._pack_latents: (B, C, h, w) -> (B, h/2 * w/2, 4C), channels-major within a patch
            packed = sample.reshape(b, c, h2, 2, w2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h2 * w2, c * 4)
            # _prepare_latent_image_ids: (h/2 * w/2, 3) = (0, row, column); text ids: (L, 3) zeros
            rows = torch.arange(h2, dtype=torch.float32).reshape(h2, 1).expand(h2, w2)
            cols = torch.arange(w2, dtype=torch.float32).reshape(1, w2).expand(h2, w2)
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h2 * w2, 3)
            txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=torch.float32)
            out = self.m(hidden_states=packed, timestep=timestep / 1000, guidance=guidance if self.guided else None,
                         pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            # FluxPipeline._unpack_latents: (B, h/2 * w/2, 4C) -> (B, C, h, w)
            return out.reshape(b, h2, w2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    return ClipPooled, t5_encoder_module(), FluxDenoiser


def transformer_inputs(guidance: bool) -> tuple[str, ...]:
    """The transformer graph's input names: the runtime's denoiser feeds, then FLUX's own."""
    names = ("sample", "timestep", "encoder_hidden_states", "pooled_projections")
    return (*names, "guidance") if guidance else names


def flux_table(guidance: bool, clip_seq: int) -> dict[str, ComponentExport]:
    """Rows for a FluxPipeline folder. ``guidance``: the transformer has a guidance embedding (FLUX.1-dev);
    ``clip_seq``: CLIP's token length (its position table). The geometry's ``seq`` is the T5 length (dynamic in
    both graphs: the transformer's receipt is taken at another length than its trace; T5's receipt at its trace's,
    its length axis is tested against transformers up to 512 in tests/export/test_flux_export.py)."""
    import torch

    ClipPooled, T5Encoder, FluxDenoiser = _modules()

    def ids(name: str, seq: int | None = None):
        def make(c: Any, g: Geometry, gen):  # (B, L) int32 token ids
            vocab = c[name].config.vocab_size
            return (torch.randint(0, vocab, (g.batch, seq or g.seq), generator=gen, dtype=torch.int32),)
        return make

    def transformer_example(c: Any, g: Geometry, gen):
        cfg = c["transformer"].config
        latent_channels = cfg.in_channels // 4  # 2x2 patches of the VAE's channels
        example = (
            torch.randn(g.batch, latent_channels, g.latent_h, g.latent_w, generator=gen),  # (B, C, h, w) float32
            torch.rand(g.batch, generator=gen) * 1000.0,  # (B,) float32 timesteps: sigma * 1000
            torch.randn(g.batch, g.seq, cfg.joint_attention_dim, generator=gen),  # (B, L, d_model) T5 states
            torch.randn(g.batch, cfg.pooled_projection_dim, generator=gen),  # (B, 768) CLIP pooled
        )
        if guidance:  # (B,) float32 guidance strength, FLUX.1-dev's usual range
            example = (*example, 1.0 + torch.rand(g.batch, generator=gen) * 4.0)
        return example

    inputs = transformer_inputs(guidance)
    axes = {"sample": LATENT_AXES, "timestep": {0: "batch"}, "encoder_hidden_states": SEQ_AXES,
            "pooled_projections": {0: "batch"}, "out_sample": LATENT_AXES}
    if guidance:
        axes["guidance"] = {0: "batch"}
    sd = table()
    return {
        "text_encoder": ComponentExport(
            "text_encoder", ("input_ids",), ("pooler_output",), {"input_ids": SEQ_AXES, "pooler_output": {0: "batch"}},
            lambda c: ClipPooled(c["text_encoder"]), ids("text_encoder", clip_seq),
        ),
        "text_encoder_2": ComponentExport(
            "text_encoder_2", ("input_ids",), ("last_hidden_state",),
            {"input_ids": SEQ_AXES, "last_hidden_state": SEQ_AXES},
            lambda c: T5Encoder(c["text_encoder_2"]), ids("text_encoder_2"),
        ),
        "transformer": ComponentExport(
            "transformer", inputs, ("out_sample",), axes, lambda c: FluxDenoiser(c["transformer"]),
            transformer_example,
        ),
        "vae_decoder": sd["vae_decoder"],
        "vae_encoder": sd["vae_encoder"],
    }


# -- the export plan of a FluxPipeline folder ------------------------------------------------------------------
CLIP_LENGTH = 77  # CLIP ViT-L's max_position_embeddings: FluxPipeline pads its prompt to tokenizer_max_length (77)
# Trace and check shapes: 16x16 / 16x12 latent cells (256 / 192 image tokens, a non-square check) and two T5
# lengths, so every dynamic axis of the transformer is exercised by the parity check; small enough for full width.
TRACE = Geometry(batch=2, latent_h=16, latent_w=16, seq=32)
CHECK = Geometry(batch=1, latent_h=16, latent_w=12, seq=24)


def flux_plan(source):
    """The ExportPlan (export/plan.py) of a FluxPipeline folder: its rows, traced at TRACE, checked at CHECK."""
    from .plan import ExportPlan

    if not (source.root / "tokenizer_2" / "tokenizer.json").is_file():
        raise ExportError(f"{source.root}/tokenizer_2/ has no tokenizer.json; the runtime reads T5's tokenizer.json "
                          "(save the pipeline with transformers' T5TokenizerFast, which writes it from spiece.model)")
    transformer = component_config(source.root, "transformer")
    guidance = transformer.get("guidance_embeds", False)
    if not isinstance(guidance, bool):
        raise ExportError(f"{source.root}/transformer/config.json: guidance_embeds={guidance!r}; expected true or "
                          "false")
    if transformer.get("patch_size", 1) != 1:
        raise ExportError(f"{source.root}/transformer/config.json: patch_size={transformer.get('patch_size')!r}; "
                          "FLUX packs 2x2 latent patches before the transformer, whose patch_size is 1")
    return ExportPlan(rows=flux_table(guidance, CLIP_LENGTH), trace=TRACE, check=CHECK)


def flux_max_sequence_length(n: int | None) -> int:
    """The longest T5 prompt a FLUX bundle takes (recorded in the manifest): ``n`` from the export, else 512."""
    if n is None:
        return T5_LIMIT
    return check_max_sequence_length(n, pipeline="FluxPipeline takes up to 512")


FLUX_STEPS = {False: 4, True: 28}  # schnell's model card (4 steps) / FluxPipeline's default (28), by guidance_embeds


def flux_manifest(manifest, max_sequence_length: int, defaults):
    """The exported manifest with T5's token limit and the variant's step count (schnell 4, dev 28) unless the
    export named one; the guidance default is dev's family default (FluxPipeline's 3.5) and schnell's 0 (its model
    card's ``guidance_scale=0.0``: nothing to apply it to), unless the export named one."""
    import dataclasses

    guidance = "guidance" in {s.name for s in manifest.components["transformer"].inputs}  # FLUX.1-dev
    steps = defaults.steps if defaults.steps is not None else FLUX_STEPS[guidance]
    scale = defaults.guidance_scale if defaults.guidance_scale is not None or guidance else 0.0
    return dataclasses.replace(manifest, max_sequence_length=max_sequence_length,
                               defaults=dataclasses.replace(manifest.defaults, steps=steps, guidance_scale=scale))
