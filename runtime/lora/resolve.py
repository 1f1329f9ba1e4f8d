"""Which model weight each LoRA layer changes, checked against the model's own layer names and shapes.

The model side is a table per component: PyTorch parameter name (``...attn1.to_q.weight``) -> its shape, from the
bundle's weights maps at run time, or from the PyTorch model at export. A diffusers-format layer names its module
with dots; a kohya layer with underscores for dots, resolved through the table (``down_blocks_0_attentions_0_...``
-> the one module whose dotted name underscores to it), so no guessing at which underscores were dots. Text
encoder names are compared without transformers' ``text_model.`` level (transformers 5 dropped it; LoRA files in
the wild keep it).

Everything a user can get wrong is one InputError naming the file: a component the bundle lacks (an SDXL LoRA on
an SD 1.x bundle), layers matching no layer (the first few named), shapes that differ (a LoRA for another model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import InputError
from .formats import LoraFile, LoraLayer

SHOWN = 3  # how many unmatched layer names an error message lists
# kohya files for SDXL name UNet blocks the original (SGM/LDM) way; diffusers maps them with the UNet's config
SGM_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_")


def sgm_named(layer: LoraLayer) -> bool:
    return layer.kohya and layer.component == "unet" and layer.module.startswith(SGM_BLOCKS)


@dataclass(frozen=True)
class Hit:
    layer: LoraLayer
    param: str  # the model's parameter name, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    shape: tuple[int, ...]  # its PyTorch shape: (out, in) or (out, in, kh, kw)


class ModelTable:
    """The layers of one model component: parameter name -> shape (None: known to exist, not locatable)."""

    def __init__(self, component: str, params: Mapping[str, tuple[int, ...] | None]):
        self.component = component
        self.params = dict(params)
        self._dotted: dict[str, str] = {}
        self._kohya: dict[str, list[str]] = {}
        for param in self.params:
            if not param.endswith(".weight"):
                continue
            module = _canonical(component, param[:-len(".weight")])
            self._dotted[module] = param
            self._kohya.setdefault(module.replace(".", "_"), []).append(param)

    def find(self, layer: LoraLayer) -> str | None:
        if not layer.kohya:
            return self._dotted.get(_canonical(self.component, layer.module))
        found = self._kohya.get(_canonical_kohya(self.component, layer.module), [])
        return found[0] if len(found) == 1 else None  # two modules underscoring alike: not this module's to pick


def _canonical(component: str, module: str) -> str:
    return module.removeprefix("text_model.") if component.startswith("text_encoder") else module


def _canonical_kohya(component: str, module: str) -> str:
    return module.removeprefix("text_model_") if component.startswith("text_encoder") else module


def resolve(lora: LoraFile, tables: Mapping[str, ModelTable], *, model: str) -> list[Hit]:
    """Every layer of ``lora`` matched to a parameter of ``tables`` (component -> table), with its shapes
    checked. ``model`` names the model in messages ("this sd1 bundle")."""
    name = lora.path.name
    absent = sorted({layer.component for layer in lora.layers} - set(tables))
    if absent:
        example = next(layer.name for layer in lora.layers if layer.component == absent[0])
        family = " (an SDXL LoRA?)" if absent[0] == "text_encoder_2" else ""
        raise InputError(f"{name} has {absent[0]} layers (e.g. {example!r}), which {model} does not have{family}: "
                         "use a LoRA made for this model's family")
    hits: list[Hit] = []
    unmatched: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for layer in lora.layers:
        table = tables[layer.component]
        param = table.find(layer)
        if param is None:
            unmatched.append(layer.name)
            continue
        if (layer.component, param) in seen:
            raise InputError(f"{name}: layers {seen[(layer.component, param)]!r} and {layer.name!r} both change "
                             f"{layer.component}.{param}; the file is broken")
        seen[(layer.component, param)] = layer.name
        shape = table.params[param]
        if shape is None:
            raise InputError(f"{name}: layer {layer.name!r}: the exporter folded {layer.component}.{param} into "
                             "another tensor, so it cannot be changed at run time; fuse this LoRA at export "
                             "(edgediff export --lora)")
        _check_shape(name, layer, param, shape, model)
        hits.append(Hit(layer=layer, param=param, shape=shape))
    sgm = next((layer.name for layer in lora.layers if sgm_named(layer)), None)
    if unmatched and sgm is not None:
        raise InputError(f"{name} names UNet blocks the original SGM/LDM way (e.g. {sgm!r}), not diffusers' "
                         "down_blocks/up_blocks; fuse it at export, where diffusers converts them "
                         "(edgediff export SRC OUT --lora FILE)")
    if unmatched:
        n, total = len(unmatched), len(lora.layers)
        which = "none of its" if n == total else f"{n} of its"
        first = ", ".join(repr(u) for u in unmatched[:SHOWN]) + (", ..." if n > SHOWN else "")
        raise InputError(f"{name}: {which} {total} layers match no layer of {model} (first: {first}); it was made "
                         "for another model (family or architecture)")
    return hits


def _check_shape(name: str, layer: LoraLayer, param: str, shape: tuple[int, ...], model: str) -> None:
    """The LoRA's (out, in[, kh, kw]) must be the weight's; a linear LoRA may target a 1x1 convolution and a 1x1
    conv LoRA a linear layer (SD 1.x's proj_in is a 1x1 conv, SD 2.x's a linear layer)."""
    up, down = layer.up, layer.down
    out, inner = up.shape[0], down.shape[1]
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else (1, 1)
    want_kernel = tuple(shape[2:]) if len(shape) == 4 else (1, 1)
    if (out, inner) != tuple(shape[:2]) or kernel != want_kernel:
        lora_shape = (out, inner, *kernel) if down.ndim == 4 else (out, inner)
        raise InputError(f"{name}: layer {layer.name!r} is {lora_shape} in the LoRA but {tuple(shape)} in {model}'s "
                         f"{layer.component} ({param}): the LoRA was made for another model")
