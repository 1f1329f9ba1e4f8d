"""diffusers Stable Diffusion pipeline folder -> edgediff ONNX bundle.

Stages, each reported through ``progress``: load (safetensors only unless allowed), export (one ONNX graph per
component, torch.onnx TorchScript exporter, dynamic batch/spatial axes), check (ONNX Runtime vs PyTorch on fresh
random inputs of a different shape than the trace, so the dynamic axes are exercised), write (manifest last).
Models are loaded one at a time and freed before the next one loads (export/plan.py says which rows need which).
A pipeline with a model of ISOLATE_BYTES or more (SD-1.5's UNet and up) traces each model in a child process and
checks its graphs with ONNX Runtime here, in a process that never imports torch (see ISOLATE_BYTES).
Everything is written into a temporary sibling folder and renamed into place at the end: an interrupted export
never leaves a half bundle at OUT.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

from edgediff import __version__
from edgediff.bundle import layout
from edgediff.bundle.describe import describe
from edgediff.bundle.manifest import GenerationDefaults, ParityReceipt, Provenance
from edgediff.bundle.writer import check_output, staged_bundle, write_manifest
from edgediff.errors import EngineError, ExportError, ParityError, missing

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
# When a source model folder holds this many bytes of weights or more, every model is traced in its own child process
# (engines/isolate.py) and its graphs are checked here, after the child has exited. What tracing leaves behind (the
# torch heap, the constant-folded copies of weights, the trace's activations) goes back to the system with the child,
# so ONNX Runtime's copy of the weights is not stacked on it, and a model killed for memory is one ExportError line.
# Below it, starting a process per model (seconds of imports) would cost more than it saves: tiny models stay here.
# Measured on sd15-random (bench/scripts/tree_rss.py): the process tree peaked 0.6 GB higher than in one process
# (7.8 vs 7.2 GB, at the UNet's trace): this process has imported torch too (plan._model_config reads diffusers'
# defaults), about 0.3 GB that one process holds once. The children buy the failure mode and no heap carried over.
ISOLATE_BYTES = 1 << 30

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
    # Found, not imported (the models may be traced in child processes); before the configs, which import diffusers.
    for lib in ("torch", "diffusers", "transformers"):
        if importlib.util.find_spec(lib) is None:
            raise missing(lib, "export", "edgediff export")
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


@dataclasses.dataclass(frozen=True)
class _Traced:
    """One exported row, as the check needs it: plain Python and numpy, so it can come back from a child process
    without torch being imported here."""

    name: str
    config: dict  # the model's config, made JSON-able (_jsonable)
    prints: dict | None  # weights_map.fingerprints, taken while torch had the weights
    reference: str  # what the expected outputs were computed with (the receipt's reference)
    input_names: tuple[str, ...]
    inputs: list  # the check inputs, numpy
    expected: list  # PyTorch's outputs on them, numpy
    reference_s: float  # seconds the PyTorch reference took (part of the check stage)


def _export_all(source: Source, tmp: Path, opset: int, progress: Progress,
                lora_files=()) -> tuple[dict[str, ParityReceipt], dict[str, dict]]:
    """Export and check every row of the source's plan; return the receipts and each component's model config."""
    from .parity import receipt_for

    groups: list[tuple[str, list[str]]] = []  # consecutive rows traced from one source model: one load each
    for name in export_plan(source).rows:
        folder = module_of(name)
        if groups and groups[-1][0] == folder:
            groups[-1][1].append(name)
        else:
            groups.append((folder, [name]))
    isolate = max(_weights_bytes(source, folder) for folder, _ in groups) >= ISOLATE_BYTES
    receipts: dict[str, ParityReceipt] = {}
    configs: dict[str, dict] = {}
    for folder, names in groups:
        if isolate:
            traced = _trace_isolated(source, tmp, opset, folder, names, lora_files, progress)
        else:
            traced = _trace_rows(source, tmp, opset, folder, names, lora_files, progress)
        for t in traced:  # checked here; the model is alive only while a later row needs it (in-process)
            configs[t.name] = t.config
            t0 = time.perf_counter()
            path = tmp / t.name / layout.GRAPH_FILE
            r = receipt_for(path, t.expected, t.inputs, t.input_names, reference=t.reference)
            progress("check", t.name, t.reference_s + time.perf_counter() - t0)
            if not r.passed:
                raise ParityError(
                    f"{t.name}: ONNX Runtime differs from PyTorch by max_rel {r.max_rel:.2e} "
                    f"(tolerance {r.tolerance:.0e}, max_abs {r.max_abs:.2e}); the export is wrong, nothing was written"
                )
            receipts[t.name] = r
            if t.prints is not None:  # after the model is freed: the graph's initializers are read from disk
                t0 = time.perf_counter()
                weights_map.write(tmp, t.name, t.prints)
                progress("map", t.name, time.perf_counter() - t0)
            _trim()  # ONNX Runtime's session is gone: its pages go back before the next model is traced
    return receipts, configs


def _trim() -> None:
    """Return the heap's free pages to the system. glibc keeps freed memory mapped in the process (a freed ONNX
    Runtime session, a freed model's buffers: hundreds of MB) and counts it resident until malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _trace_rows(source: Source, tmp: Path, opset: int, folder: str, names: list[str], lora_files,
                progress: Progress) -> Iterator[_Traced]:
    """Load source model ``folder`` once, export the graph of each row in ``names`` and yield what its check needs.
    The model is freed before the last row is yielded: ONNX Runtime never holds its copy of the weights next to
    torch's, except for the rows before the last (the VAE decoder, whose encoder is traced next)."""
    import diffusers
    import torch

    from .parity import reference_outputs

    plan = export_plan(source)
    t0 = time.perf_counter()
    loaded = {folder: _load(source, folder)}  # the one model in memory
    lora.fuse_into(loaded[folder], folder, lora_files, source)  # --lora: fused before tracing
    progress("load", folder, time.perf_counter() - t0)
    for i, name in enumerate(names):
        spec = plan.rows[name]
        cfg = loaded[folder].config
        config = _jsonable(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))  # no torch types in it
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
        reference = f"torch {torch.__version__} / diffusers {diffusers.__version__} {cls}"
        expected = reference_outputs(module, check_inputs)
        inputs = [t.numpy() for t in check_inputs]
        del module, example, check_inputs
        if i == len(names) - 1:  # free the weights before ONNX Runtime loads its own copy of them
            loaded.clear()
            gc.collect()
            _trim()
        yield _Traced(name, config, prints, reference, tuple(spec.input_names), inputs, expected,
                      time.perf_counter() - t0)


def _trace_isolated(source: Source, tmp: Path, opset: int, folder: str, names: list[str], lora_files,
                    progress: Progress) -> list[_Traced]:
    """_trace_rows in a child process; its progress lines are passed on as it writes them. The child dying (the OOM
    killer's SIGKILL) is one ExportError; an error raised in it (ExportError, ...) is raised here as it was."""
    from edgediff.engines.isolate import run_isolated

    with _Relay(progress) as relay:
        try:
            return run_isolated(_trace_in_child, source, tmp, opset, folder, names, lora_files, relay.path,
                                what=f"exporting {folder}")
        except EngineError as exc:
            raise ExportError(str(exc)) from None


def _trace_in_child(source: Source, tmp: Path, opset: int, folder: str, names: list[str], lora_files,
                    events: str) -> list[_Traced]:
    with open(events, "a", encoding="utf-8") as f:
        def progress(stage: str, component: str, seconds: float) -> None:
            f.write(f"{stage}\t{component}\t{seconds!r}\n")
            f.flush()

        return list(_trace_rows(source, tmp, opset, folder, names, lora_files, progress))


class _Relay:
    """A file a child process appends ``stage<TAB>component<TAB>seconds`` lines to, read by a thread here that
    passes each line to ``progress`` as it arrives (the CLI's progress callback cannot be sent to the child)."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="edgediff-export-progress", daemon=True)

    def __enter__(self) -> "_Relay":
        fd, self.path = tempfile.mkstemp(prefix="edgediff-export-", suffix=".progress")
        os.close(fd)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        os.unlink(self.path)

    def _pump(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            pending = ""
            while True:
                last = self._stop.is_set()  # read once more after the child has ended
                pending += f.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    stage, component, seconds = line.split("\t")
                    self._progress(stage, component, float(seconds))
                if last:
                    return
                self._stop.wait(0.2)


def _weights_bytes(source: Source, folder: str) -> int:
    """Bytes of weight files in the folder source model ``folder`` loads from (as _load finds it)."""
    lib, cls_name = source.classes.get(folder) or model_class(folder)
    if folder == TINY_FOLDER and lib != "transformers":
        where = Path(source.tiny_vae)
    elif cls_name == "ControlNetModel":
        where = Path(controlnet_folder(source, folder))
    else:
        where = source.root / folder
    return sum(p.stat().st_size for p in where.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


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
