"""ControlNet rows of the exporter's component table: ``edgediff export SRC OUT --controlnet DIR[:NAME]`` (repeatable),
or a StableDiffusionControlNetPipeline folder whose ``controlnet/`` (``controlnet_1/``, ... for a
MultiControlNetModel) is exported with the pipeline.

Two kinds of graph are added (docs/bundle.md, "ControlNet"):

* ``controlnet_<name>``, one per ControlNet: ``sample, timestep, encoder_hidden_states, controlnet_cond,
  conditioning_scale`` (SDXL: ``text_embeds, time_ids`` before ``controlnet_cond``, the UNet's added conditions)
  -> ``down_block_res_sample_{i}`` (i = 0 .. R-2) and ``mid_block_res_sample``.
  ``controlnet_cond`` is the preprocessed control image, (B, 3, H, W) in [0, 1] at pixel resolution.
  ``conditioning_scale`` is a (R,) float32 vector, one factor per residual: diffusers' ControlNetModel multiplies
  every residual by ``conditioning_scale`` (a float) or, in guess mode, by ``logspace(-1, 0, R) * scale``
  (controlnet.py, "0.1 to 1.0"); one vector input covers both, so neither the scale nor guess mode needs a
  re-export. The network itself runs with ``conditioning_scale=1.0`` (global pooling, where the config asks for
  it, commutes with the scale).
* ``unet_controlnet``: the pipeline's UNet (its own inputs, SDXL's included) that also takes
  ``down_block_additional_residual_{i}`` and
  ``mid_block_additional_residual`` (UNet2DConditionModel's ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``). The plain ``unet`` graph stays as it is and is what every step runs unless a
  ControlNet is active at that step (runtime/controlnet.py), so generation without ControlNet costs nothing more.

Every ControlNet folder is checked against the pipeline's UNet and VAE before anything is loaded: the same family
(SD 1.x/2.x or SDXL: ``addition_embed_type``), the same block layout (so its residuals fit the UNet's skip
connections), the same cross-attention and pooled-embedding widths, and a conditioning
embedding that downsamples the control image to the latent grid (``2 ** (len(conditioning_embedding_out_channels)
- 1)`` must equal the VAE's scale factor).
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from edgediff.bundle.derived import vae_scale_factor
from edgediff.bundle.schema import CONTROLNET_PREFIX, RESIDUAL_UNET
from edgediff.config import read_json
from edgediff.errors import ConfigError, ExportError

from .components import ComponentExport, Geometry
from .source import weights_pickled

CONTROLNET_CLASS = "ControlNetModel"
CONTROLNET_PIPELINES = ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")


def component(name: str) -> str:
    """The bundle component of the ControlNet called ``name``: ``controlnet_<name>`` (its folder, too)."""
    return CONTROLNET_PREFIX + name


def residual_count(config: dict) -> int:
    """R: the down-block residuals (conv_in's output, each resnet/attention layer's, each downsampler's) plus the
    mid-block's, from a UNet or ControlNet config (UNet2DConditionModel / ControlNetModel build them alike)."""
    blocks = list(config.get("down_block_types") or ())
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(blocks)
    return 1 + sum(int(n) + (k < len(blocks) - 1) for k, n in enumerate(layers)) + 1


def parse_option(text: str) -> tuple[Path, str | None]:
    """``DIR[:NAME]`` -> (folder, name or None). The name is split off only when what follows the last ':' is a
    valid ControlNet name and the whole text is not itself an existing folder."""
    head, sep, tail = text.rpartition(":")
    if sep and head and _NAME.fullmatch(tail) and not Path(text).expanduser().is_dir():
        return Path(head).expanduser(), tail
    return Path(text).expanduser(), None


def default_name(folder: Path) -> str:
    """A ControlNet's name from its folder: lower case, anything but [a-z0-9_-] as '-' (``sd-controlnet-canny``)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", folder.resolve().name.lower()).strip("-_")[:48]
    return name if name and _NAME.fullmatch(name) else "controlnet"


def pipeline_controlnets(root: Path, index: dict) -> list[tuple[Path, str]]:
    """The ControlNet folders a StableDiffusionControlNetPipeline folder holds: ``controlnet/`` (name ``default``)
    or, for a MultiControlNetModel, ``controlnet/``, ``controlnet_1/``, ... (names ``0``, ``1``, ...)."""
    entry = index.get("controlnet")
    if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        return []
    if entry[1] == CONTROLNET_CLASS:
        return [(root / "controlnet", "default")]
    if entry[1] == "MultiControlNetModel":
        out, k = [], 0
        while (root / ("controlnet" if k == 0 else f"controlnet_{k}")).is_dir():
            out.append((root / ("controlnet" if k == 0 else f"controlnet_{k}"), str(k)))
            k += 1
        return out
    raise ExportError(f"{root}/model_index.json: controlnet class {entry[1]!r} is not supported; expected "
                      f"{CONTROLNET_CLASS} or MultiControlNetModel")


def with_controlnets(source, given, unet_config: dict, vae_config: dict, *, allow_pickle: bool = False):
    """``source`` (export/source.py Source) with its ControlNets attached: the pipeline folder's own (a ControlNet
    pipeline) and ``given`` (``[(folder, name or None), ...]`` from ``--controlnet``), each checked against the
    UNet and VAE configs; raises ExportError with one line naming what does not fit."""
    found = pipeline_controlnets(source.root, source.index) + [(Path(d), n or default_name(Path(d))) for d, n in given]
    if not found:
        return source
    if source.sdxl and source.index.get("requires_aesthetics_score"):
        raise ExportError("ControlNet export needs a base pipeline; an SDXL refiner (aesthetic-score time ids) has no "
                          "ControlNets")
    names: dict[str, Path] = {}
    pickled = []
    for folder, name in found:
        if not _NAME.fullmatch(name):
            raise ExportError(f"--controlnet name {name!r}: use 1-48 characters of a-z, 0-9, '_' and '-', starting "
                              "with a letter or digit")
        if name in names:
            raise ExportError(f"two ControlNets are named {name!r} ({names[name]} and {folder}); name them apart "
                              "with --controlnet DIR:NAME")
        if _check(folder, unet_config, vae_config, allow_pickle):
            pickled.append(component(name))
        names[name] = folder
    return replace(source, controlnets=tuple((n, f) for n, f in names.items()),
                   pickle_components=source.pickle_components + tuple(pickled))


def _check(folder: Path, unet: dict, vae: dict, allow_pickle: bool) -> bool:
    """Check one ControlNet folder against the UNet and VAE; True when its weights are a (permitted) pickle."""
    what = f"--controlnet {folder}"
    if not folder.is_dir():
        raise ExportError(f"{what}: not a folder; give a diffusers ControlNetModel folder (config.json + "
                          "diffusion_pytorch_model.safetensors, e.g. lllyasviel/sd-controlnet-canny)")
    try:
        cfg = read_json(folder / "config.json", what=f"{what} config.json")
    except ConfigError as exc:
        raise ExportError(f"{what}: {exc}") from None
    if cfg.get("_class_name") != CONTROLNET_CLASS:
        raise ExportError(f"{what} holds a {cfg.get('_class_name')!r}, not a diffusers {CONTROLNET_CLASS}")
    if cfg.get("addition_embed_type") != unet.get("addition_embed_type"):
        kinds = {None: "SD 1.x/2.x", "text_time": "SDXL"}
        raise ExportError(f"{what} is an {kinds.get(cfg.get('addition_embed_type'), 'unknown')} ControlNet and the "
                          f"pipeline an {kinds.get(unet.get('addition_embed_type'), 'unknown')} one: use a ControlNet "
                          "made for this model family")
    for key, default in (("cross_attention_dim", 1280), ("block_out_channels", (320, 640, 1280, 1280)),
                         ("in_channels", 4), ("projection_class_embeddings_input_dim", None)):
        mine = unet.get(key, default)
        theirs = cfg.get(key, default)
        if key == "in_channels" and int(mine) == 2 * int(theirs) + 1:
            raise ExportError(f"{what}: the pipeline's UNet is an inpainting UNet ({mine} input channels); "
                              "ControlNet export needs a regular UNet")
        if list(mine if isinstance(mine, (list, tuple)) else [mine]) != \
                list(theirs if isinstance(theirs, (list, tuple)) else [theirs]):
            raise ExportError(f"{what} has {key} {theirs} and the pipeline's UNet {mine}: it was made for another "
                              "model (an SD 1.x ControlNet needs an SD 1.x pipeline, 2.x a 2.x one)")
    if residual_count(cfg) != residual_count(unet):
        raise ExportError(f"{what} makes {residual_count(cfg)} residuals and the pipeline's UNet takes "
                          f"{residual_count(unet)}: its block layout does not fit this UNet")
    f = vae_scale_factor(vae.get("block_out_channels", [0]))
    emb = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if 2 ** (len(emb) - 1) != f:
        raise ExportError(f"{what} downsamples the control image by {2 ** (len(emb) - 1)} and the pipeline's VAE "
                          f"by {f}: its residuals would not fit the latent grid")
    return weights_pickled(folder, allow_pickle=allow_pickle, what=what)


def _modules():
    import torch

    class ControlNet(torch.nn.Module):
        # SDXL: (sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond, scale)
        def __init__(self, m, added: tuple[str, ...]):
            super().__init__()
            self.m, self.added = m, added

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            added = dict(zip(self.added, rest)) or None  # SDXL's pooled text embeddings and time ids
            controlnet_cond, conditioning_scale = rest[len(self.added):]
            down, mid = self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=1.0, guess_mode=False,
                               added_cond_kwargs=added, return_dict=False)
            # (R,) scales: one per residual, diffusers' conditioning_scale or its guess-mode ramp times it
            out = [d * conditioning_scale[k] for k, d in enumerate(down)]
            return (*out, mid * conditioning_scale[len(down)])

    class ResidualUNet(torch.nn.Module):
        # SDXL: (sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals)
        def __init__(self, m, added: tuple[str, ...]):
            super().__init__()
            self.m, self.added = m, added

        def forward(self, sample, timestep, encoder_hidden_states, *rest):
            added = dict(zip(self.added, rest)) or None
            residuals = rest[len(self.added):]
            return self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                          down_block_additional_residuals=tuple(residuals[:-1]),
                          mid_block_additional_residual=residuals[-1], return_dict=False)[0]

    return ControlNet, ResidualUNet


def _residual_shapes(unet_config: dict, g: Geometry) -> list[tuple[int, int, int, int]]:
    """(B, C, h, w) of each residual at geometry ``g``: the UNet halves the latent grid after every block but the
    last (ceil, as its stride-2 convs with padding 1 do)."""
    chans = list(unet_config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = unet_config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(chans)
    h, w = g.latent_h, g.latent_w
    shapes = [(g.batch, chans[0], h, w)]
    for k, c in enumerate(chans):
        shapes += [(g.batch, c, h, w)] * int(layers[k])
        if k < len(chans) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((g.batch, c, h, w))
    shapes.append((g.batch, chans[-1], h, w))  # the mid block's
    return shapes


def down_names(count: int, prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{i}" for i in range(count - 1))


def controlnet_rows(source, unet_config: dict) -> dict[str, ComponentExport]:
    """The rows for ``source.controlnets``: ``unet_controlnet`` (traced from the pipeline's UNet) and one
    ``controlnet_<name>`` per ControlNet; {} without ControlNets."""
    if not getattr(source, "controlnets", ()):
        return {}
    import torch

    ControlNet, ResidualUNet = _modules()
    r = residual_count(unet_config)
    res_in = (*down_names(r, "down_block_additional_residual"), "mid_block_additional_residual")
    res_out = (*down_names(r, "down_block_res_sample"), "mid_block_res_sample")

    def axes(names) -> dict[str, dict[int, str]]:  # each residual's own spatial dims: they halve block by block
        return {n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names}

    # SDXL's UNet and ControlNets also take the pooled text embeddings and the 6 micro-conditioning time ids
    added = ("text_embeds", "time_ids") if source.sdxl else ()
    base_axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                 "encoder_hidden_states": {0: "batch", 1: "sequence"}, **{n: {0: "batch"} for n in added}}

    def added_inputs(cfg, g: Geometry, gen) -> tuple:
        if not added:
            return ()
        pooled = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim * 6
        return (torch.randn(g.batch, pooled, generator=gen),  # (B, pooled) OpenCLIP-G embedding
                torch.randint(0, 1025, (g.batch, 6), generator=gen).float())  # (B, 6) sizes and crop offsets

    def unet_inputs(c, g: Geometry, gen):
        unet = c["unet"]
        head = (torch.randn(g.batch, unet.config.in_channels, g.latent_h, g.latent_w, generator=gen),
                torch.rand(g.batch, generator=gen) * 999.0,
                torch.randn(g.batch, g.seq, unet.config.cross_attention_dim, generator=gen),
                *added_inputs(unet.config, g, gen))
        return (*head, *(torch.randn(*s, generator=gen) for s in _residual_shapes(dict(unet.config), g)))

    rows = {RESIDUAL_UNET: ComponentExport(
        RESIDUAL_UNET, ("sample", "timestep", "encoder_hidden_states", *added, *res_in), ("out_sample",),
        {**base_axes, **axes(res_in), "out_sample": {0: "batch", 2: "height", 3: "width"}},
        lambda c: ResidualUNet(c["unet"], added), unet_inputs)}

    def net_row(comp: str) -> ComponentExport:
        def inputs(c, g: Geometry, gen):
            net = c[comp]
            emb = net.config.conditioning_embedding_out_channels or (16, 32, 96, 256)
            f = 2 ** (len(emb) - 1)
            return (torch.randn(g.batch, net.config.in_channels, g.latent_h, g.latent_w, generator=gen),
                    torch.rand(g.batch, generator=gen) * 999.0,
                    torch.randn(g.batch, g.seq, net.config.cross_attention_dim, generator=gen),
                    *added_inputs(net.config, g, gen),
                    torch.rand(g.batch, net.config.conditioning_channels, g.latent_h * f, g.latent_w * f,
                               generator=gen),
                    torch.rand(r, generator=gen) + 0.5)  # (R,) scales, not all 1: the scaling is checked too

        return ComponentExport(
            comp, ("sample", "timestep", "encoder_hidden_states", *added, "controlnet_cond", "conditioning_scale"),
            res_out, {**base_axes, "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"},
                      **axes(res_out)},
            lambda c: ControlNet(c[comp], added), inputs)

    for name, _ in source.controlnets:
        rows[component(name)] = net_row(component(name))
    return rows


def controlnet_folder(source, comp: str) -> Path:
    """The folder the ControlNet component ``comp`` is loaded from."""
    return dict((component(n), f) for n, f in source.controlnets)[comp]
