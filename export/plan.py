"""What an export does for one source pipeline, decided from its configs before any weights are loaded: the
component table rows (SD's or SDXL's), the PyTorch model each row is traced from, and the trace/check shapes.

The exporter loads one model at a time in the rows' order and frees it once no later row needs it, so the peak is
one model (SDXL's UNet: 10.3 GB fp32) instead of the whole pipeline.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from edgediff.bundle.derived import latent_multiple
from edgediff.config import read_json
from edgediff.bundle.schema import DEEPCACHE_COMPONENTS
from edgediff.errors import ConfigError, ExportError

from .components import ComponentExport, Geometry, table
from .components_lcm import lcm_unet_row, takes_timestep_cond
from .components_sd3 import MAX_SEQUENCE_LENGTH, SD3_PIPELINES, sd3_plan
from .components_sdxl import sdxl_table
from .components_tiny_vae import TINY_FOLDER, tiny_vae_rows
from .components_deepcache import check_unet, deepcache_rows
from .components_controlnet import CONTROLNET_CLASS, controlnet_rows
from .source import Source

# bundle component -> the source pipeline's model folder it is traced from
MODULE_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
             "text_encoder_3": "text_encoder_3", "transformer": "transformer",  # SD3 (components_sd3.py)
             "vae_decoder": "vae", "vae_encoder": "vae", "vae_decoder_tiny": TINY_FOLDER,
             "vae_encoder_tiny": TINY_FOLDER,
             **dict.fromkeys(DEEPCACHE_COMPONENTS, "unet")}  # DeepCache's graphs (components_deepcache.py)
# source model folder -> (library, class) it is loaded with
MODEL_CLASSES = {
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    TINY_FOLDER: ("diffusers", "AutoencoderTiny"),  # loaded from source.tiny_vae, not from the pipeline folder
}


@dataclass(frozen=True)
class ExportPlan:
    rows: dict[str, ComponentExport]  # bundle component -> its row, in export order
    trace: Geometry  # the shapes the graphs are traced at
    check: Geometry  # other shapes, for the parity check of the dynamic axes

    def last_use(self, name: str) -> bool:
        """True when no row after ``name`` is traced from the same source model (it can be freed now)."""
        later = list(self.rows)[list(self.rows).index(name) + 1:]
        return all(module_of(n) != module_of(name) for n in later)


def module_of(name: str) -> str:
    """The source model a bundle component is traced from (MODULE_OF; a ControlNet from its own folder, its
    component name; the residual UNet from the UNet)."""
    return MODULE_OF.get(name) or ("unet" if name == "unet_controlnet" else name)


def model_class(folder: str) -> tuple[str, str]:
    """(library, class) the source model ``folder`` (a module_of value) is loaded with."""
    return MODEL_CLASSES.get(folder) or ("diffusers", CONTROLNET_CLASS)


def export_plan(source: Source) -> ExportPlan:
    if source.pipeline_class in SD3_PIPELINES:  # a transformer denoiser and three text towers: its own plan
        return sd3_plan(source, source.max_sequence_length or MAX_SEQUENCE_LENGTH)
    if source.flux:  # packed-latent transformer, CLIP pooled + T5 (components_flux.py)
        from .components_flux import flux_plan

        return flux_plan(source)
    unet = _model_config(source, "unet")
    texts = {m: _model_config(source, m) for m in source.modules if m.startswith("text_encoder")}
    if source.sdxl:
        # the refiner's UNet embeds 5 time ids (original size, crop, aesthetic score) instead of 6
        time_ids = 5 if source.index.get("requires_aesthetics_score") else 6
        rows = sdxl_table({m: int(c["num_hidden_layers"]) for m, c in texts.items()}, time_ids)
    else:
        rows = table()
    if takes_timestep_cond(unet):  # an LCM UNet: the guidance embedding is one more input (components_lcm.py)
        if source.sdxl:
            raise ExportError("this SDXL UNet takes a guidance embedding (time_cond_proj_dim: an LCM-distilled SDXL); "
                              "edgediff exports LCMs distilled from SD 1.x/2.x only — for SDXL use the base model with an "
                              "LCM-LoRA and --preset lcm")
        rows = {**rows, **lcm_unet_row()}
    if source.deepcache:  # DeepCache's graphs right after the UNet, traced from the model already loaded
        check_unet(unet)
        extra, ordered = deepcache_rows(source.deepcache, rows["unet"]), {}
        for n, row in rows.items():
            ordered.update({n: row, **(extra if n == "unet" else {})})
        rows = ordered
    if source.tiny_vae is not None:
        rows = {**rows, **tiny_vae_rows()}
    if source.controlnets:  # the residual UNet right after the UNet (same model loaded), the ControlNets last
        if takes_timestep_cond(unet):
            raise ExportError("--controlnet with an LCM UNet (time_cond_proj_dim) is not supported; export the base "
                              "model with the ControlNet and use an LCM-LoRA")
        extra, ordered = controlnet_rows(source, unet), {}
        for n, row in rows.items():
            ordered[n] = row
            if n == "unet":
                ordered["unet_controlnet"] = extra.pop("unet_controlnet")
        rows = {**ordered, **extra}
    seq = int(next(iter(texts.values()))["max_position_embeddings"])
    trace, check = geometries(unet, seq)
    return ExportPlan(rows=rows, trace=trace, check=check)


def geometries(unet_config: dict, seq: int) -> tuple[Geometry, Geometry]:
    """Trace at the model's native size with CFG batch 2; check at batch 1 and a non-square size."""
    size = unet_config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    down = latent_multiple(1, unet_config["block_out_channels"])  # latent sides divide by this (1: in latent cells)
    trace = Geometry(batch=2, latent_h=size, latent_w=size, seq=seq)
    check = Geometry(batch=1, latent_h=size, latent_w=max(down, size - down), seq=seq)
    return trace, check


def _model_config(source: Source, folder: str) -> dict:
    """The model's config as its class sees it: config.json over the constructor's defaults (no weights read)."""
    import importlib

    lib, cls_name = MODEL_CLASSES[folder]
    path = source.root / folder / "config.json"
    try:
        raw = read_json(path, what=f"{folder}/config.json")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    if lib == "transformers":
        cls = getattr(importlib.import_module("transformers"), "CLIPTextConfig")
        return {**cls().to_dict(), **raw}
    cls = getattr(importlib.import_module(lib), cls_name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **raw}
