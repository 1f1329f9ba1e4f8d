"""diffusers Stable Diffusion pipeline folder -> edgediff ONNX bundle.

Stages, each reported through ``progress``: load (safetensors only unless allowed), export (one ONNX graph per
component, torch.onnx TorchScript exporter, dynamic batch/spatial axes), check (ONNX Runtime vs PyTorch on fresh
random inputs of a different shape than the trace, so the dynamic axes are exercised), write (manifest last).
Everything is written into a temporary sibling folder and renamed into place at the end: an interrupted export
never leaves a half bundle at OUT.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from edgediff import __version__
from edgediff.bundle import layout
from edgediff.bundle.derived import latent_multiple
from edgediff.bundle.describe import describe
from edgediff.bundle.manifest import GenerationDefaults, ParityReceipt, Provenance
from edgediff.bundle.writer import check_output, staged_bundle, write_manifest
from edgediff.errors import ExportError, ParityError, missing

from .components import Geometry, table
from .source import Source, inspect_source

MIN_OPSET = 17
# Graphs whose protobuf would pass this size get their weights in one external-data file beside them
# ("model.onnx_data", as optimum names it): protobuf cannot hold more than 2 GiB.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

Progress = Callable[[str, str, float], None]  # (stage, component, seconds)


def _quiet(stage: str, component: str, seconds: float) -> None:
    pass


def export_pipeline(
    src: str | Path,
    out: str | Path,
    *,
    opset: int = MIN_OPSET,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = _quiet,
    defaults: GenerationDefaults = GenerationDefaults(),
) -> Path:
    """Export ``src`` (a diffusers pipeline folder) to the bundle folder ``out``; return ``out``. ``defaults``
    records the steps / guidance the model should run with when a call names none."""
    out = Path(out).expanduser()
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
    source = inspect_source(src, allow_pickle=allow_pickle)
    check_output(out, overwrite)
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing(exc.name or "torch", "export", "edgediff export") from None

    with staged_bundle(out, overwrite) as tmp:
        t0 = time.perf_counter()
        comps = _load(source)
        progress("load", "pipeline", time.perf_counter() - t0)
        receipts = _export_all(comps, source, tmp, opset, progress)
        t0 = time.perf_counter()
        _copy_side_files(source.root, tmp, comps)
        manifest = dataclasses.replace(describe(tmp, _provenance(source), parity=receipts), defaults=defaults)
        write_manifest(tmp, manifest)  # last: the commit marker
    progress("write", "bundle", time.perf_counter() - t0)
    return out


def _load(source: Source) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):  # our progress lines replace theirs
        log.disable_progress_bar()
        log.set_verbosity_error()
    kw = dict(local_files_only=True, torch_dtype=torch.float32)
    st = {c: c not in source.pickle_components for c in ("text_encoder", "unet", "vae")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comps = {
                "text_encoder": CLIPTextModel.from_pretrained(source.root / "text_encoder", use_safetensors=st["text_encoder"], **kw),
                "unet": UNet2DConditionModel.from_pretrained(source.root, subfolder="unet", use_safetensors=st["unet"], **kw),
                "vae": AutoencoderKL.from_pretrained(source.root, subfolder="vae", use_safetensors=st["vae"], **kw),
            }
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load the pipeline's weights from {source.root}: {first}") from None
    for m in comps.values():
        m.eval().to(torch.float32)
        m.requires_grad_(False)
    # The exported graph must not depend on which attention kernel torch picks at trace time.
    comps["unet"].set_default_attn_processor()
    comps["vae"].set_default_attn_processor()
    return comps


def _geometries(comps: dict) -> tuple[Geometry, Geometry]:
    """Trace at the model's native size with CFG batch 2; check at batch 1 and a non-square size."""
    unet_cfg = comps["unet"].config
    size = unet_cfg.sample_size[0] if isinstance(unet_cfg.sample_size, (list, tuple)) else unet_cfg.sample_size
    down = latent_multiple(1, unet_cfg.block_out_channels)  # latent sides must divide by this (VAE factor 1: latents)
    seq = comps["text_encoder"].config.max_position_embeddings
    trace = Geometry(batch=2, latent_h=size, latent_w=size, seq=seq)
    check = Geometry(batch=1, latent_h=size, latent_w=max(down, size - down), seq=seq)
    return trace, check


def _export_all(comps: dict, source: Source, tmp: Path, opset: int, progress: Progress) -> dict[str, ParityReceipt]:
    import diffusers
    import torch

    from .parity import receipt

    trace_geo, check_geo = _geometries(comps)
    receipts: dict[str, ParityReceipt] = {}
    for name, spec in table().items():
        module = spec.wrap(comps).eval()
        t0 = time.perf_counter()
        path = tmp / name / layout.GRAPH_FILE
        path.parent.mkdir(parents=True)
        example = spec.inputs(comps, trace_geo, torch.Generator().manual_seed(0))
        _export_graph(module, example, spec, path, opset)
        progress("export", name, time.perf_counter() - t0)

        t0 = time.perf_counter()
        geo = check_geo if name != "text_encoder" else trace_geo
        check_inputs = spec.inputs(comps, geo, torch.Generator().manual_seed(1))
        cls = type(getattr(module, "m")).__name__
        ref = f"torch {torch.__version__} / diffusers {diffusers.__version__} {cls}"
        r = receipt(path, module, check_inputs, spec.input_names, reference=ref)
        progress("check", name, time.perf_counter() - t0)
        if not r.passed:
            raise ParityError(
                f"{name}: ONNX Runtime differs from PyTorch by max_rel {r.max_rel:.2e} "
                f"(tolerance {r.tolerance:.0e}, max_abs {r.max_abs:.2e}); the export is wrong, nothing was written"
            )
        receipts[name] = r
    return receipts


def _export_graph(module, example: tuple, spec, path: Path, opset: int) -> None:
    import onnx
    import torch

    raw_dir = path.parent / "_raw"
    raw_dir.mkdir()
    raw = raw_dir / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter: fast, deterministic, and what optimum uses; dynamic_axes name the dims.
            torch.onnx.export(
                module, example, str(raw), input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        except Exception as exc:  # torch raises many types here; the message is what a user can act on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{spec.name}: torch.onnx.export failed: {first}") from None
    model = onnx.load(str(raw), load_external_data=True)
    large = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _proto_fits(model) else True
    onnx.save_model(
        model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
        location="model.onnx_data", size_threshold=1024,
    )
    shutil.rmtree(raw_dir)


def _proto_fits(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GiB
        return False


def _copy_side_files(src: Path, tmp: Path, comps: dict) -> None:
    """Configs, tokenizer and scheduler files, in optimum's layout."""
    shutil.copy2(src / "model_index.json", tmp / layout.MODEL_INDEX)
    (tmp / "scheduler").mkdir()
    shutil.copy2(src / "scheduler" / "scheduler_config.json", tmp / layout.SCHEDULER_CONFIG)
    shutil.copytree(src / "tokenizer", tmp / layout.TOKENIZER_DIR, ignore=shutil.ignore_patterns(".*"))
    configs = {"text_encoder": comps["text_encoder"].config.to_dict(), "unet": dict(comps["unet"].config),
               "vae_decoder": dict(comps["vae"].config), "vae_encoder": dict(comps["vae"].config)}
    for name, cfg in configs.items():
        (tmp / layout.config_path(name)).write_text(json.dumps(_jsonable(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_") or k == "_class_name"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _provenance(source: Source) -> Provenance:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return Provenance(
        exporter=f"edgediff {__version__}",
        libraries={"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                   "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        source=str(source.root),
        source_class=source.pipeline_class,
    )
