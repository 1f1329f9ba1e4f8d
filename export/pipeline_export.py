"""diffusers Stable Diffusion pipeline folder -> edgediff ONNX bundle.

Stages, each reported through ``progress``: load (safetensors only unless allowed), export (one ONNX graph per
component, torch.onnx TorchScript exporter, dynamic batch/spatial axes), check (ONNX Runtime vs PyTorch on fresh
random inputs of a different shape than the trace, so the dynamic axes are exercised), write (manifest last).
Models are loaded one at a time and freed before the next one loads (export/plan.py says which rows need which).
Everything is written into a temporary sibling folder and renamed into place at the end: an interrupted export
never leaves a half bundle at OUT.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from edgediff import __version__
from edgediff.bundle import layout
from edgediff.bundle.describe import describe
from edgediff.bundle.manifest import GenerationDefaults, ParityReceipt, Provenance
from edgediff.bundle.writer import check_output, staged_bundle, write_manifest
from edgediff.errors import ExportError, ParityError, missing

from . import lora, weights_map
from .external_data import gather_external_data, has_external_data
from .components_lcm import recommended_defaults
from .components_flux import flux_manifest, flux_max_sequence_length
from .components_sd3 import MAX_SEQUENCE_LENGTH, SD3_PIPELINES, check_max_sequence_length, sd3_manifest
from .components_tiny_vae import TINY_FOLDER, with_tiny_vae
from .components_deepcache import check_unet, parse_branches
from .components_controlnet import controlnet_folder, with_controlnets
from .plan import _model_config, export_plan, model_class, module_of
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
    tiny_vae: str | Path | None = None,
    loras=(),
    controlnets=(),
    max_sequence_length: int | None = None,
    deepcache=None,
) -> Path:
    """Export ``src`` (a diffusers pipeline folder) to the bundle folder ``out``; return ``out``. ``defaults``
    records the steps / guidance the model should run with when a call names none. ``tiny_vae``: a diffusers
    AutoencoderTiny folder (TAESD) exported too, as vae_decoder_tiny / vae_encoder_tiny. ``loras``: LoRA files
    -> weights ({"style.safetensors": 0.8}) fused into the models before tracing (export/lora.py).
    ``controlnets``: ``[(ControlNetModel folder, name or None), ...]`` exported too, with the UNet that takes their
    residuals (export/components_controlnet.py); a ControlNet pipeline folder's own controlnet/ always is.
    ``max_sequence_length``: SD3's / FLUX's T5 token length, recorded in the manifest (calls may ask for up to it;
    default SD3 256, FLUX 512). ``deepcache``: DeepCache branch ids ("0,3" or (0, 3)) to export the full and shallow
    UNet graphs for (export/components_deepcache.py)."""
    out = Path(out).expanduser()
    if opset < MIN_OPSET:
        raise ExportError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
    source = inspect_source(src, allow_pickle=allow_pickle)
    if tiny_vae is not None:
        source = with_tiny_vae(source, tiny_vae, _model_config(source, "vae"), allow_pickle=allow_pickle)
    if controlnets or "unet" in source.modules:  # (SD3 has no UNet to attach ControlNets to)
        source = with_controlnets(source, controlnets, _model_config(source, "unet"), _model_config(source, "vae"),
                                  allow_pickle=allow_pickle)
    if source.pipeline_class in SD3_PIPELINES:  # T5's token length, checked before any model loads
        source = dataclasses.replace(source, max_sequence_length=check_max_sequence_length(
            MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length))
    elif source.flux:  # components_flux.py
        source = dataclasses.replace(source, max_sequence_length=flux_max_sequence_length(max_sequence_length))
    elif max_sequence_length is not None:
        raise ExportError(f"--max-sequence-length applies to SD3 and FLUX pipelines (T5 prompts), not "
                          f"{source.pipeline_class}")
    if deepcache is not None:  # branch ids checked against the UNet's config before any model loads
        if "unet" not in source.modules:
            raise ExportError(f"--deepcache needs a UNet; {source.pipeline_class} has none")
        unet_config = _model_config(source, "unet")
        check_unet(unet_config)
        source = dataclasses.replace(source, deepcache=parse_branches(deepcache, unet_config))
    lora_files = lora.prepare(loras, source) if loras else []  # every file checked before any model loads
    check_output(out, overwrite)
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing(exc.name or "torch", "export", "edgediff export") from None

    with staged_bundle(out, overwrite) as tmp:
        receipts, configs = _export_all(source, tmp, opset, progress, lora_files)
        t0 = time.perf_counter()
        _copy_side_files(source, tmp, configs)
        prov = dataclasses.replace(_provenance(source), transforms=lora.provenance(lora_files))
        manifest = describe(tmp, prov, parity=receipts)
        manifest = dataclasses.replace(manifest, defaults=recommended_defaults(manifest.family, defaults))
        if source.flux:
            manifest = flux_manifest(manifest, source.max_sequence_length, defaults)
        elif source.max_sequence_length is not None:
            manifest = sd3_manifest(manifest, source.max_sequence_length, defaults)
        write_manifest(tmp, manifest)  # last: the commit marker
    progress("write", "bundle", time.perf_counter() - t0)
    return out


def _load(source: Source, folder: str):
    """One model of the source pipeline (``folder`` is a key of plan.MODEL_CLASSES), fp32, eval, no grad."""
    import importlib

    import torch

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):  # our progress lines replace theirs
        log.disable_progress_bar()
        log.set_verbosity_error()
    lib, cls_name = source.classes.get(folder) or model_class(folder)
    cls = getattr(importlib.import_module(lib), cls_name)
    kw = dict(local_files_only=True, torch_dtype=torch.float32, use_safetensors=folder not in source.pickle_components)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if lib == "transformers":
                model = cls.from_pretrained(source.root / folder, **kw)
            elif folder == TINY_FOLDER:  # --tiny-vae: its own folder, outside the pipeline's
                model = cls.from_pretrained(source.tiny_vae, **kw)
            elif cls_name == "ControlNetModel":  # --controlnet, or the pipeline's controlnet/: its own folder
                model = cls.from_pretrained(controlnet_folder(source, folder), **kw)
            else:
                model = cls.from_pretrained(source.root, subfolder=folder, **kw)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load the pipeline's weights from {source.root}: {first}") from None
    model.eval().to(torch.float32)
    model.requires_grad_(False)
    if lib == "diffusers" and hasattr(model, "set_default_attn_processor"):  # AutoencoderTiny has no attention
        # The exported graph must not depend on which attention kernel torch picks at trace time.
        model.set_default_attn_processor()
    return model


def _export_all(source: Source, tmp: Path, opset: int, progress: Progress,
                lora_files=()) -> tuple[dict[str, ParityReceipt], dict[str, dict]]:
    """Export and check every row of the source's plan; return the receipts and each component's model config."""
    import diffusers
    import torch

    from .parity import receipt_for, reference_outputs

    plan = export_plan(source)
    receipts: dict[str, ParityReceipt] = {}
    configs: dict[str, dict] = {}
    loaded: dict = {}  # source model folder -> the one model in memory
    for name, spec in plan.rows.items():
        folder = module_of(name)
        if folder not in loaded:
            loaded.clear()
            gc.collect()  # the previous model is gone before the next one loads
            t0 = time.perf_counter()
            loaded[folder] = _load(source, folder)
            lora.fuse_into(loaded[folder], folder, lora_files, source)  # --lora: fused before tracing
            progress("load", folder, time.perf_counter() - t0)
        cfg = loaded[folder].config
        configs[name] = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        module = spec.wrap(loaded).eval()
        t0 = time.perf_counter()
        path = tmp / name / layout.GRAPH_FILE
        path.parent.mkdir(parents=True)
        example = spec.inputs(loaded, plan.trace, torch.Generator().manual_seed(0))
        _export_graph(module, example, spec, path, opset)
        prints = weights_map.fingerprints(name, getattr(module, "m"))  # for LoRA hot-swap, while torch has them
        progress("export", name, time.perf_counter() - t0)

        t0 = time.perf_counter()
        geo = plan.trace if name.startswith("text_encoder") else plan.check
        check_inputs = spec.inputs(loaded, geo, torch.Generator().manual_seed(1))
        cls = type(getattr(module, "m")).__name__
        ref = f"torch {torch.__version__} / diffusers {diffusers.__version__} {cls}"
        expected = reference_outputs(module, check_inputs)
        del module, example
        if plan.last_use(name):  # free the weights before ONNX Runtime loads its own copy of them
            loaded.clear()
            gc.collect()
        r = receipt_for(path, expected, check_inputs, spec.input_names, reference=ref)
        progress("check", name, time.perf_counter() - t0)
        if not r.passed:
            raise ParityError(
                f"{name}: ONNX Runtime differs from PyTorch by max_rel {r.max_rel:.2e} "
                f"(tolerance {r.tolerance:.0e}, max_abs {r.max_abs:.2e}); the export is wrong, nothing was written"
            )
        receipts[name] = r
        if prints is not None:  # after the model is freed: the graph's initializers are read from disk
            t0 = time.perf_counter()
            weights_map.write(tmp, name, prints)
            progress("map", name, time.perf_counter() - t0)
    return receipts, configs


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
    model = onnx.load(str(raw), load_external_data=False)
    if has_external_data(model):  # over 2 GiB: torch wrote a file per tensor; gather them without loading them
        gather_external_data(model, raw_dir, path.parent / "model.onnx_data")
        onnx.save_model(model, str(path))
    else:
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


def _copy_side_files(source: Source, tmp: Path, configs: dict[str, dict]) -> None:
    """Configs, tokenizer(s) and scheduler files, in optimum's layout."""
    src = source.root
    shutil.copy2(src / "model_index.json", tmp / layout.MODEL_INDEX)
    (tmp / "scheduler").mkdir()
    shutil.copy2(src / "scheduler" / "scheduler_config.json", tmp / layout.SCHEDULER_CONFIG)
    dirs = {"tokenizer": layout.TOKENIZER_DIR, "tokenizer_2": layout.TOKENIZER_2_DIR, "tokenizer_3": layout.TOKENIZER_3_DIR}
    for tok in source.tokenizers:
        shutil.copytree(src / tok, tmp / dirs[tok], ignore=shutil.ignore_patterns(".*"))
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
