"""Stable Diffusion 3 / 3.5's rows of the exporter's component table, its source check and its export plan
(diffusers ``StableDiffusion3Pipeline`` folders; family ``sd3``).

Components and their graphs' I/O (the runtime's conditioner, runtime/families/sd3.py, reads these names):

- ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP ViT-bigG), both ``CLIPTextModelWithProjection``:
  ``input_ids`` (B, 77) int32 -> ``text_embeds`` (B, projection) and ``hidden_states.<i>`` (B, 77, hidden) for i = 0
  .. layers - 1: ``hidden_states.<layers-1>`` is the penultimate state diffusers' _get_clip_prompt_embeds takes with
  clip_skip None, ``hidden_states.<layers-1-k>`` the one it takes with clip_skip k (hidden_states[-(k + 2)]). The
  last layer's state is not exported (no clip_skip reads it); the earlier ones cost no compute, only outputs.
- ``text_encoder_3`` (optional; T5 v1.1 XXL ``T5EncoderModel``): ``input_ids`` (B, L) int32 -> ``last_hidden_state``
  (B, L, d_model), no attention mask, as _get_t5_prompt_embeds calls it. L is dynamic; the bundle records the
  longest it was exported for (``max_sequence_length``, default 256 as diffusers).
- ``transformer`` (``SD3Transformer2DModel``): ``sample`` (B, C, h, w), ``timestep`` (B,) float32 (the scheduler's
  timestep, sigma x 1000, as the pipeline passes it), ``encoder_hidden_states`` (B, 77 + L, joint_attention_dim),
  ``pooled_projections`` (B, pooled) -> ``out_sample`` (B, C, h, w), the flow velocity. ``sample`` keeps the UNet's
  name so the denoising loop feeds every denoiser alike (runtime/job.py).
- ``vae_decoder`` / ``vae_encoder``: SD's rows; the runtime applies ``scaling_factor`` and ``shift_factor``.

Large models: each component is traced in turn and freed before the next loads (one model in memory), and a graph
over 2 GiB is written with its weights in one external-data file (pipeline_export.py).
"""
from __future__ import annotations

from pathlib import Path

from edgediff.errors import ExportError

from .components import ComponentExport, Geometry, table
from .t5 import component_config, t5_encoder_module
from .t5 import check_max_sequence_length as check_t5_length

SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
CLIP_LENGTH = 77  # CLIP's max_position_embeddings: both towers' token length
MAX_SEQUENCE_LENGTH = 256  # diffusers' StableDiffusion3Pipeline default for the T5 tokens
# source folder -> (library, class) it is loaded with
SD3_CLASSES = {
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
_CLIP_TOKENIZER = ("CLIPTokenizer", "CLIPTokenizerFast")
_TOKENIZERS = {"tokenizer": _CLIP_TOKENIZER, "tokenizer_2": _CLIP_TOKENIZER, "tokenizer_3": ("T5TokenizerFast", "T5Tokenizer")}
_OPTIONAL = ("text_encoder_3", "tokenizer_3")  # diffusers runs SD3 with text_encoder_3=None


def inspect_sd3(root: Path, index: dict, *, allow_pickle: bool):
    """The Source of an SD3 pipeline folder (export/source.py), one clear line per problem."""
    from .source import Source, _null, check_components, weights_pickled

    absent = [c for c in _OPTIONAL if _null(index.get(c))]
    if len(absent) == 1:
        raise ExportError(f"{root}/model_index.json has {absent[0]!r} null but not its partner; text_encoder_3 and "
                          "tokenizer_3 come together (a T5-less SD3 pipeline has neither)")
    expected = {**{k: (v[1],) for k, v in SD3_CLASSES.items()}, **_TOKENIZERS}
    check_components(root, index, expected, absent)
    if "tokenizer_3" not in absent and not (root / "tokenizer_3" / "tokenizer.json").is_file():
        raise ExportError(f"{root}/tokenizer_3/ has no tokenizer.json; the runtime reads T5's tokenizer.json (save "
                          "the pipeline with transformers' T5TokenizerFast, which writes it from spiece.model)")
    modules = tuple(c for c in SD3_CLASSES if c not in absent)
    pickled = [comp for comp in modules if weights_pickled(root / comp, allow_pickle=allow_pickle)]
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise ExportError(f"{root}/scheduler/scheduler_config.json is missing; the pipeline folder is incomplete")
    sched = index.get("scheduler") or [None, ""]
    tokenizers = tuple(t for t in _TOKENIZERS if t not in absent)
    return Source(root=root, pipeline_class=index["_class_name"], scheduler_class=str(sched[1]),
                  pickle_components=tuple(pickled), modules=modules, tokenizers=tokenizers, index=index,
                  classes=dict(SD3_CLASSES))


def _modules():
    import torch

    class ClipProjectionTower(torch.nn.Module):
        """CLIPTextModelWithProjection: text_embeds (pooled, projected) and every hidden state but the last."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids.long(), output_hidden_states=True, return_dict=True)
            return (out.text_embeds, *out.hidden_states[:-1])

    class Sd3Transformer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
            return self.m(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, return_dict=False)[0]

    return ClipProjectionTower, t5_encoder_module(), Sd3Transformer


def sd3_table(clip_layers: dict[str, int], t5: bool, t5_length: int) -> dict[str, ComponentExport]:
    """Rows for an SD3 pipeline: ``clip_layers`` = num_hidden_layers of text_encoder and text_encoder_2; ``t5``:
    whether text_encoder_3 is present; ``t5_length``: its token length at trace time."""
    import torch

    ClipProjectionTower, T5Tower, Sd3Transformer = _modules()
    seq_axes = {0: "batch", 1: "sequence"}

    def clip_inputs(name):
        def make(c, g: Geometry, gen):
            return (torch.randint(0, c[name].config.vocab_size, (g.batch, CLIP_LENGTH), generator=gen,
                                  dtype=torch.int32),)
        return make

    def t5_inputs(c, g: Geometry, gen):  # g.seq = 77 + the T5 length (the transformer's text sequence)
        return (torch.randint(0, c["text_encoder_3"].config.vocab_size, (g.batch, g.seq - CLIP_LENGTH),
                              generator=gen, dtype=torch.int32),)

    def transformer_inputs(c, g: Geometry, gen):
        cfg = c["transformer"].config
        return (
            torch.randn(g.batch, cfg.in_channels, g.latent_h, g.latent_w, generator=gen),
            torch.rand(g.batch, generator=gen) * 1000.0,  # (B,) float32: sigma x 1000
            torch.randn(g.batch, g.seq, cfg.joint_attention_dim, generator=gen),
            torch.randn(g.batch, cfg.pooled_projection_dim, generator=gen),
        )

    rows: dict[str, ComponentExport] = {}
    for name in ("text_encoder", "text_encoder_2"):
        # hidden_states.0 .. <layers-1> (optimum's names; penultimate_name(layers) is the last of them)
        hidden = tuple(f"hidden_states.{i}" for i in range(clip_layers[name]))
        rows[name] = ComponentExport(
            name, ("input_ids",), ("text_embeds", *hidden),
            {"input_ids": seq_axes, "text_embeds": {0: "batch"}, **{h: seq_axes for h in hidden}},
            (lambda n: lambda c: ClipProjectionTower(c[n]))(name), clip_inputs(name),
        )
    if t5:
        rows["text_encoder_3"] = ComponentExport(
            "text_encoder_3", ("input_ids",), ("last_hidden_state",),
            {"input_ids": seq_axes, "last_hidden_state": seq_axes},
            lambda c: T5Tower(c["text_encoder_3"]), t5_inputs,
        )
    rows["transformer"] = ComponentExport(
        "transformer", ("sample", "timestep", "encoder_hidden_states", "pooled_projections"), ("out_sample",),
        {
            "sample": {0: "batch", 2: "height", 3: "width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": seq_axes,
            "pooled_projections": {0: "batch"},
            "out_sample": {0: "batch", 2: "height", 3: "width"},
        },
        lambda c: Sd3Transformer(c["transformer"]), transformer_inputs,
    )
    sd = table()
    rows["vae_decoder"], rows["vae_encoder"] = sd["vae_decoder"], sd["vae_encoder"]
    return rows


def sd3_plan(source, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """The ExportPlan of an SD3 source: trace at the native latent size with CFG batch 2 and the full text
    sequence; check at batch 1, a non-square size and a shorter T5 sequence (the dynamic axes exercised)."""
    from .plan import ExportPlan

    check_max_sequence_length(max_sequence_length)
    cfg = component_config(source.root, "transformer")
    clip_layers = {n: int(component_config(source.root, n).get("num_hidden_layers", 12))
                   for n in ("text_encoder", "text_encoder_2")}
    t5 = "text_encoder_3" in source.modules
    rows = sd3_table(clip_layers, t5, max_sequence_length)
    size = int(cfg.get("sample_size", 128))
    p = int(cfg.get("patch_size", 2))
    seq = CLIP_LENGTH + max_sequence_length
    trace = Geometry(batch=2, latent_h=size, latent_w=size, seq=seq)
    check = Geometry(batch=1, latent_h=size, latent_w=max(p, size - 2 * p),
                     seq=CLIP_LENGTH + max(1, max_sequence_length // 2))
    return ExportPlan(rows=rows, trace=trace, check=check)


def check_max_sequence_length(n) -> int:
    return check_t5_length(n, pipeline="diffusers' SD3 default is 256")


SD3_STEPS = 28  # diffusers' StableDiffusion3Pipeline default (its guidance 7.0 is runtime/defaults.py's)


def sd3_manifest(manifest, max_sequence_length: int, defaults):
    """The exported manifest with T5's token length, and diffusers' SD3 step count unless the export named one."""
    import dataclasses

    steps = manifest.defaults.steps if defaults.steps is not None else SD3_STEPS
    return dataclasses.replace(manifest, max_sequence_length=max_sequence_length,
                               defaults=dataclasses.replace(manifest.defaults, steps=steps))
