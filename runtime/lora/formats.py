"""LoRA files -> low-rank layers: the two formats in the wild, read without torch.

- diffusers / PEFT (``save_lora_weights``): ``unet.<module>.lora_A.weight`` (r, in[, kh, kw]) and ``lora_B.weight``
  (out, r[, 1, 1]); text encoders under ``text_encoder.`` / ``text_encoder_2.``; alpha and rank in the header's
  ``lora_adapter_metadata`` (PEFT's LoraConfig per component: ``unet.lora_alpha``, ``unet.alpha_pattern``, ...) or
  in ``<module>.alpha`` tensors. Older diffusers names (``.lora.down``/``.lora.up``, ``lora_linear_layer``,
  ``processor.to_q_lora``) are read too.
- kohya / A1111 (sd-scripts): ``lora_unet_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` and a scalar
  ``.alpha``; text encoders ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``).

The scale of a layer is ``weight * alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``); without an alpha, alpha is the
rank (scale 1), as diffusers and PEFT read such files. LyCORIS's other decompositions (LoHa, LoKr, Tucker mid
factors), DoRA and full-weight diffs are refused with one line: only the low-rank product B @ A is computed here.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .safetensors_np import SafetensorsFile

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# suffix -> role; the longest suffix is tried first
SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT / diffusers
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' LoRACompatible layers (<= 0.24)
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # diffusers' old text encoders
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # diffusers' old attention processors (processor.to_q_lora)
    ".alpha": "alpha",
}
# diffusers component prefixes, and kohya's (prefix -> component)
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# what other adapter kinds look like, for the one line that refuses them
_REFUSED = (
    (re.compile(r"\.hada_(w1|w2|t1|t2)"), "a LyCORIS LoHa (hada_* tensors)"),
    (re.compile(r"\.lokr_(w1|w2|t2)"), "a LyCORIS LoKr (lokr_* tensors)"),
    (re.compile(r"\.lora_mid\."), "a LyCORIS LoCon with Tucker mid factors (lora_mid tensors)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)"), "a DoRA (magnitude vectors)"),
    (re.compile(r"\.(diff|diff_b)$"), "a full-weight difference (.diff tensors), not a low-rank LoRA"),
    (re.compile(r"\.(oft_|boft_|ia3_)"), "an OFT/BOFT/IA3 adapter, not a LoRA"),
    (re.compile(r"\.lora_B\.bias$"), "a LoRA with bias terms (lora_B.bias)"),
)
_FOREIGN = (  # other model families' LoRAs, recognizable from their prefixes
    (("transformer.", "lora_transformer_", "lora_unet_double_blocks_", "lora_unet_single_blocks_"),
     "a transformer-based model (SD3/FLUX)"),
)


@dataclass(frozen=True)
class LoraLayer:
    component: str  # the bundle component it changes: unet, text_encoder, text_encoder_2
    module: str  # the module name as the file writes it, prefix removed: dotted, or kohya's underscored
    kohya: bool  # ``module`` is kohya's underscore-joined name
    down: np.ndarray  # A: (r, in) or (r, in, kh, kw), float32
    up: np.ndarray  # B: (out, r) or (out, r, 1, 1), float32
    scale: float  # alpha / rank (or alpha / sqrt(rank)); the user's weight multiplies it

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def name(self) -> str:
        """How the file names this layer, for messages."""
        prefix = {v: k for k, v in (KOHYA_PREFIXES if self.kohya else DIFFUSERS_PREFIXES).items()}[self.component]
        return prefix + self.module


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: tuple[LoraLayer, ...]


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA ``.safetensors`` file; InputError naming the file and the first problem."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin", ".pkl"):
        raise InputError(f"{path} is a pickle file, which can run code when loaded; LoRAs are read from "
                         ".safetensors only (convert it with safetensors' convert tools)")
    f = SafetensorsFile(path)
    keys = f.keys()
    if not keys:
        raise InputError(f"{path} holds no tensors; it is not a LoRA")
    for key in keys:
        for pattern, what in _REFUSED:
            if pattern.search(key):
                raise InputError(f"{path.name} is {what} (key {key!r}); only LoRA (lora_A/lora_B or "
                                 "lora_down/lora_up) is supported: merge it into the model with its own tools, or "
                                 "export a pipeline that has it fused")
    for prefixes, what in _FOREIGN:
        hit = next((k for k in keys if k.startswith(prefixes)), None)
        if hit is not None:
            raise InputError(f"{path.name} is a LoRA for {what} (key {hit!r}); this runtime's bundles are Stable "
                             "Diffusion UNets: use a LoRA made for this model's family")
    groups: dict[tuple[str, str, bool], dict[str, str]] = {}
    for key in keys:
        component, module, kohya, role = _split(path, key)
        roles = groups.setdefault((component, module, kohya), {})
        if role in roles:
            raise InputError(f"{path.name}: layer {module!r} has two {role} tensors ({roles[role]!r}, {key!r})")
        roles[role] = key
    config = _metadata_config(path, f.metadata)
    layers = []
    for (component, module, kohya), roles in groups.items():
        missing = [r for r in ("down", "up") if r not in roles]
        if missing:
            have = next(iter(roles.values()))
            raise InputError(f"{path.name}: layer {module!r} has {have!r} but no {missing[0]} tensor; the file is "
                             "incomplete")
        down, up = _float(f, path, roles["down"]), _float(f, path, roles["up"])
        _check_pair(path, module, down, up)
        rank = int(down.shape[0])
        alpha, rslora = _alpha(f, path, roles.get("alpha"), config.get(component), module, rank)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        layers.append(LoraLayer(component=component, module=module, kohya=kohya, down=down, up=up,
                                scale=float(scale)))
    return LoraFile(path=path, layers=tuple(layers))


def _split(path: Path, key: str) -> tuple[str, str, bool, str]:
    """(component, module, kohya, role) of one key."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            stem, role = key[:-len(suffix)], SUFFIXES[suffix]
            if suffix.startswith("_lora."):
                stem += "_lora"  # the processor's name (to_q_lora) is resolved by _old_diffusers_name
            break
    else:
        raise InputError(f"{path.name}: key {key!r} is not a LoRA tensor (expected <layer>.lora_A/lora_B.weight, "
                         "<layer>.lora_down/lora_up.weight or <layer>.alpha)")
    stem = stem.removeprefix("base_model.model.")  # PEFT's own wrapper prefix
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix):
            return KOHYA_PREFIXES[prefix], stem[len(prefix):], True, role
    for prefix in sorted(DIFFUSERS_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix):
            return DIFFUSERS_PREFIXES[prefix], _old_diffusers_name(stem[len(prefix):]), False, role
    raise InputError(f"{path.name}: key {key!r} names no component: expected the prefixes unet. / text_encoder. / "
                     "text_encoder_2. (diffusers) or lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ (kohya)")


def _old_diffusers_name(module: str) -> str:
    """diffusers <= 0.24 named attention LoRAs after their processor: ``attn1.processor.to_q_lora`` is
    ``attn1.to_q``, ``to_out_lora`` is ``to_out.0``."""
    if ".processor." not in module:
        return module
    head, _, tail = module.partition(".processor.")
    tail = {"to_out_lora": "to_out.0"}.get(tail, tail.removesuffix("_lora"))
    return f"{head}.{tail}"


def _float(f: SafetensorsFile, path: Path, key: str) -> np.ndarray:
    if f.dtype(key) not in ("F16", "BF16", "F32", "F64"):
        raise InputError(f"{path.name}: tensor {key!r} is {f.dtype(key)}; LoRA factors are floating point")
    a = f.get(key).astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(f"{path.name}: tensor {key!r} holds NaN/Inf; the file is broken")
    return a


def _check_pair(path: Path, module: str, down: np.ndarray, up: np.ndarray) -> None:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise InputError(f"{path.name}: layer {module!r}: lora_down {down.shape} / lora_up {up.shape}; expected "
                         "(r, in) / (out, r) for linear layers or (r, in, kh, kw) / (out, r, 1, 1) for convolutions")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise InputError(f"{path.name}: layer {module!r}: lora_up {up.shape} has a {up.shape[2]}x{up.shape[3]} "
                         "kernel; a conv LoRA's up factor is 1x1")
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise InputError(f"{path.name}: layer {module!r}: lora_down has rank {down.shape[0]} but lora_up rank "
                         f"{up.shape[1]} ({down.shape} / {up.shape}); the file is broken")


def _metadata_config(path: Path, meta: dict[str, str]) -> dict[str, dict]:
    """PEFT LoraConfig fields per component from diffusers' ``lora_adapter_metadata`` ({} when absent)."""
    raw = meta.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise InputError(f"{path.name}: its {METADATA_KEY} metadata is not JSON") from None
    if not isinstance(flat, dict):
        raise InputError(f"{path.name}: its {METADATA_KEY} metadata is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        out.setdefault(component, {})[field] = value
    for component, cfg in out.items():
        if cfg.get("use_dora"):
            raise InputError(f"{path.name} is a DoRA ({component}.use_dora in its metadata); only plain LoRA is "
                             "supported")
    return out


def _alpha(f: SafetensorsFile, path: Path, alpha_key: str | None, config: dict | None, module: str,
           rank: int) -> tuple[float, bool]:
    """(alpha, rslora) of one layer: its ``.alpha`` tensor, else PEFT's config (alpha_pattern, lora_alpha), else
    the rank."""
    rslora = bool((config or {}).get("use_rslora", False))
    if alpha_key is not None:
        a = f.get(alpha_key)
        if a.size != 1 or not np.isfinite(a).all():
            raise InputError(f"{path.name}: {alpha_key!r} must be one finite number, not {a.shape} {a.dtype}")
        return float(a.reshape(())), rslora
    if config:
        pattern = config.get("alpha_pattern") or {}
        for key, value in pattern.items():  # PEFT's get_pattern_key: the key matches a suffix of the module name
            if re.match(rf"(.*\.)?({key})$", module):
                return float(value), rslora
        if config.get("lora_alpha") is not None:
            return float(config["lora_alpha"]), rslora
    return float(rank), rslora
