"""``edgediff export SRC OUT --lora FILE[:WEIGHT] ...``: LoRAs fused into the PyTorch models before tracing, with
diffusers' own LoRA loading (what ``load_lora_weights`` does: its state-dict reader and model loader) +
``set_adapters`` + ``fuse_lora``, then ``unload_lora_weights`` (which keeps the fused weights); the bundle's graphs
are the fused models, and any precision can follow (quantize after).

Every file is first read and matched the runtime's way (edgediff.lora: format, component, names, shapes), so a key
that matches no layer or a LoRA for another family is one ExportError line before minutes of export, where
diffusers would only log a warning and fuse what it could.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

from edgediff.bundle.checksums import sha256_file
from edgediff.errors import ExportError, InputError
from edgediff.lora.apply import LoraSpec, lora_specs
from edgediff.lora.formats import LoraFile, read_lora
from edgediff.lora.resolve import ModelTable, resolve, sgm_named
from edgediff.lora.weights_map import LORA_COMPONENTS

from .source import Source

Loras = Sequence[tuple[LoraSpec, LoraFile]]


def prepare(loras: Any, source: Source) -> list[tuple[LoraSpec, LoraFile]]:
    """Read and check every LoRA before any model loads: format, and components the source pipeline has."""
    try:
        specs = lora_specs(loras)
        files = [(s, read_lora(s.path)) for s in specs]
    except InputError as exc:
        raise ExportError(str(exc)) from None
    have = set(source.modules)
    for spec, f in files:
        absent = sorted({layer.component for layer in f.layers} - have)
        if absent:
            sdxl = " (an SDXL LoRA?)" if absent[0] == "text_encoder_2" else ""
            raise ExportError(f"{spec.path.name} has {absent[0]} layers, which {source.pipeline_class} at "
                              f"{source.root} does not have{sdxl}: use a LoRA made for this model's family")
    return files


def provenance(loras: Loras) -> tuple[str, ...]:
    """What the manifest's provenance.transforms records: each file, its weight and its sha256."""
    return tuple(f"export --lora {s.path.name}:{s.weight:g} (sha256 {sha256_file(s.path, fresh=True)})"
                 for s, _ in loras)


def fuse_into(model, folder: str, loras: Loras, source: Source) -> None:
    """Fuse the LoRAs' layers for ``folder`` (unet, text_encoder, text_encoder_2) into ``model`` in place."""
    import torch

    if folder not in LORA_COMPONENTS:
        return
    mine = [(s, f) for s, f in loras if any(layer.component == folder for layer in f.layers)]
    if not mine:
        return
    table = ModelTable(folder, {f"{n}.weight": tuple(m.weight.shape) for n, m in model.named_modules()
                                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
    counts = []
    for spec, f in mine:
        part = LoraFile(f.path, tuple(layer for layer in f.layers if layer.component == folder))
        counts.append(len(part.layers))
        if any(sgm_named(layer) for layer in part.layers):
            continue  # SDXL kohya block names: diffusers converts them; the count below checks that all were placed
        try:
            resolve(part, {folder: table}, model=f"the source's {folder}")
        except InputError as exc:
            raise ExportError(str(exc)) from None
    import diffusers.utils.logging as dlog

    holder = _holder(folder, model, source)
    names = [f"edgediff_lora_{i}" for i in range(len(mine))]
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)  # diffusers logs a failed load before raising: our line says it once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, (spec, _), count in zip(names, mine, counts):
                _load_one(holder, folder, model, str(spec.path), name, source)
                placed = _placed(model, name)
                if placed != count:  # diffusers only logs layers it cannot place
                    raise ExportError(f"{spec.path.name}: diffusers placed {placed} of its {count} {folder} layers; "
                                      f"the others match no layer of the source's {folder} (a LoRA for another "
                                      "model?)")
            holder.set_adapters(names, adapter_weights=[s.weight for s, _ in mine])
            holder.fuse_lora(components=[folder], lora_scale=1.0, adapter_names=names)
            holder.unload_lora_weights()  # the LoRA layers go; the fused weights stay
    except (ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"diffusers could not fuse the LoRAs into {folder}: {first}") from None
    finally:
        dlog.set_verbosity(level)


def _placed(model, adapter: str) -> int:
    """How many of the model's layers carry ``adapter`` (PEFT LoRA layers keep one lora_A per adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))


def _load_one(holder, folder: str, model, path: str, adapter: str, source: Source) -> None:
    """What ``holder.load_lora_weights(path)`` does, for the one model in memory: diffusers' state-dict reader
    (kohya and old formats converted its way), then its loader into that model (load_lora_weights itself would
    also load into the other models, which are not there)."""
    kw = {"return_lora_metadata": True}
    if source.sdxl and folder == "unet":
        kw["unet_config"] = model.config  # SDXL kohya files name SGM blocks; diffusers maps them with the config
    state_dict, alphas, metadata = holder.lora_state_dict(path, **kw)
    if folder == "unet":
        holder.load_lora_into_unet(state_dict, network_alphas=alphas, unet=model, adapter_name=adapter,
                                   metadata=metadata, _pipeline=holder)
    else:
        holder.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=model, prefix=folder,
                                           lora_scale=1.0, adapter_name=adapter, metadata=metadata,
                                           _pipeline=holder)


def _holder(folder: str, model, source: Source):
    """A diffusers pipeline holding only ``model`` (the exporter has one model in memory at a time): the object
    diffusers' LoRA loader methods work on."""
    import diffusers

    if source.sdxl:
        parts = dict(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=None,
                     scheduler=None)
        cls = diffusers.StableDiffusionXLPipeline
    else:
        parts = dict(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=None, safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
        cls = diffusers.StableDiffusionPipeline
    parts[folder] = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**parts)
