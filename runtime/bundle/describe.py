"""Describe a bundle folder from its files: model facts from the diffusers configs, component entries from the ONNX
graphs. Used by the exporter to write ``edgediff.json`` and by the reader for bundles written by optimum (which
carry no manifest) — one source of truth for both."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from ..config import read_json
from ..errors import BundleError, ConfigError
from . import layout
from .checksums import sha256_file
from .derived import vae_scale_factor
from .graph_io import graph_io
from .manifest import COMPONENTS, MANIFEST_NAME, Component, FileEntry, Manifest, ParityReceipt, Provenance
from .safety import check_external_data, resolve_inside
from .schema import RESIDUAL_UNET, is_component

_VAE_CONFIG_DIRS = ("vae_decoder", "vae_encoder", "vae")
# transformer config _class_name -> manifest family
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def _config(root: Path, rel: str) -> dict[str, Any]:
    try:
        return read_json(resolve_inside(root, rel, what=rel), what=rel)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None


def model_facts(root: Path) -> dict[str, Any]:
    """The model-level manifest fields, read from the configs the bundle carries."""
    vae_rel = next((layout.config_path(d) for d in _VAE_CONFIG_DIRS if (root / d / "config.json").is_file()), None)
    if vae_rel is None:
        raise BundleError(f"{root}: no VAE config (vae_decoder/config.json); re-export the bundle")
    vae = _config(root, vae_rel)
    denoiser = next((d for d in layout.DENOISERS if (root / d / "config.json").is_file()), layout.DENOISERS[0])
    unet = _config(root, layout.config_path(denoiser))  # the UNet's config, or SD3/FLUX's transformer's
    # SDXL's refiner has only the second (OpenCLIP-G) text encoder
    text_dir = next((d for d in ("text_encoder", "text_encoder_2") if (root / d / "config.json").is_file()), "text_encoder")
    text = _config(root, layout.config_path(text_dir))
    sched = _config(root, layout.SCHEDULER_CONFIG)
    if "scaling_factor" not in vae:
        # Old SD1 configs predate the key; diffusers' AutoencoderKL then uses its own default. Follow diffusers.
        warnings.warn(f"{vae_rel} has no scaling_factor; using diffusers' AutoencoderKL default 0.18215", stacklevel=2)
    scaling_factor = float(vae.get("scaling_factor", 0.18215))
    scale = vae_scale_factor(vae.get("block_out_channels", [0]))
    prediction_type = sched.get("prediction_type", "epsilon")
    if denoiser != "unet":  # a diffusion transformer trained with rectified flow: the class names the family
        family = TRANSFORMER_FAMILIES.get(unet.get("_class_name", ""))
        if family is None:
            raise BundleError(f"{root}: transformer class {unet.get('_class_name')!r} is not one edgediff knows "
                              f"(known: {', '.join(TRANSFORMER_FAMILIES)})")
        prediction_type = "flow"
    elif unet.get("addition_embed_type") == "text_time":  # SDXL: pooled text + micro-conditioning time ids
        index = _config(root, layout.MODEL_INDEX)
        family = "sdxl-refiner" if index.get("requires_aesthetics_score") else "sdxl"
    elif unet.get("time_cond_proj_dim"):  # a Latent Consistency Model: the UNet takes a guidance embedding
        family = "lcm"
    elif prediction_type == "v_prediction":
        family = "sd2-v"
    elif text.get("hidden_act") == "gelu":  # OpenCLIP ViT-H text tower (SD 2.x); SD 1.x's CLIP uses quick_gelu
        family = "sd2"
    else:
        family = "sd1"
    # FLUX's transformer config has no sample_size: FluxPipeline.default_sample_size (128 latent cells) applies
    sample_size = unet.get("sample_size", 128 if family == "flux" else 64)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return dict(
        family=family,
        prediction_type=prediction_type,
        default_height=int(sample_size) * scale,
        default_width=int(sample_size) * scale,
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale_factor=scale,
        scaling_factor=scaling_factor,
        shift_factor=vae.get("shift_factor"),
        text_max_length=int(text.get("max_position_embeddings", 77)),
    )


def file_entry(root: Path, rel: str) -> FileEntry:
    path = resolve_inside(root, rel, what=rel)
    return FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path))


def component_entry(root: Path, name: str, *, precision: str = "fp32", parity: ParityReceipt | None = None) -> Component:
    graph = layout.graph_path(name)
    graph_file = resolve_inside(root, graph, what=graph)
    externals = check_external_data(root, graph)
    inputs, outputs = graph_io(graph_file)
    files = tuple(file_entry(root, rel) for rel in [graph, *externals])
    return Component(name=name, model=graph, files=files, inputs=inputs, outputs=outputs, precision=precision, parity=parity)


def present_components(root: Path) -> list[str]:
    names = [c for c in (*COMPONENTS, RESIDUAL_UNET) if (root / layout.graph_path(c)).is_file()]
    if root.is_dir():  # the ControlNets (export --controlnet), by name
        names += sorted(p.name for p in root.iterdir() if is_component(p.name) and p.name not in names
                        and (p / layout.GRAPH_FILE).is_file())
    return names


def other_files(root: Path, components: dict[str, Component]) -> tuple[FileEntry, ...]:
    """Every regular file that is neither a component file nor the manifest, sorted, hash-pinned."""
    taken = {f.path for c in components.values() for f in c.files} | {MANIFEST_NAME}
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            rel = Path(dirpath, fn).relative_to(root).as_posix()
            if rel not in taken and not fn.startswith("."):
                rels.append(rel)
    return tuple(file_entry(root, rel) for rel in sorted(rels))


def describe(
    root: Path,
    provenance: Provenance,
    *,
    parity: dict[str, ParityReceipt] | None = None,
    precision: dict[str, str] | None = None,
) -> Manifest:
    """Build the manifest of the bundle folder ``root`` as it is on disk now."""
    parity = parity or {}
    precision = precision or {}
    names = present_components(root)
    if not any(d in names for d in layout.DENOISERS):
        raise BundleError(f"{root}: no unet/model.onnx; not an ONNX Stable Diffusion bundle")
    comps = {
        n: component_entry(root, n, precision=precision.get(n, "fp32"), parity=parity.get(n)) for n in names
    }
    return Manifest(components=comps, files=other_files(root, comps), provenance=provenance, **model_facts(root))
