"""The built-in model's diffusers source, rebuilt from its shipped bundle: a StableDiffusionPipeline folder whose
weights are exactly the bundle's ONNX graphs', so that ``edgediff export`` can derive more graphs from it (DeepCache's
``--deepcache``, a LoRA's weights map) without re-running the recipe's ~100 minutes of training.

    python -m edgediff.export.recipes.shapes.rebuild --out /tmp/shapes-pipeline [--bundle runtime/models/shapes]
    edgediff export /tmp/shapes-pipeline OUT --deepcache 0 --default-steps 20 --default-guidance 5.0

Each model is built from its own config in the bundle (``text_encoder/config.json``: CLIPTextModel;
``unet/config.json``: UNet2DConditionModel; ``vae_decoder/config.json`` = ``vae_encoder/config.json``:
AutoencoderKL) and its weights are read back from the graphs' initializers:

- ``m.<param>``: torch.onnx names an initializer after the parameter it holds, under the exporter's wrapper
  (``self.m``, export/components.py): ``m.conv_in.weight`` -> ``conv_in.weight``. The VAE's two graphs each hold
  half of AutoencoderKL (decoder + post_quant_conv, encoder + quant_conv).
- ``onnx::<Op>_<n>``: a tensor constant folding made from a parameter, named by the node that reads it; which
  parameter is read off that node's scope (``/m/down_blocks.0/.../to_q/MatMul`` -> ``...to_q``):
  ``MatMul`` input 1 = a Linear's weight transposed (a Linear on a 3-D input traces as MatMul(x, W^T) [+ Add]);
  ``Mul`` / ``Add`` input 1 of shape (C, 1[, 1]) = GroupNorm's weight / bias, unsqueezed for the broadcast after
  torch.onnx's InstanceNormalization. A scope starts at the module the wrapper entered (``/m/...``; ``/decoder/...``
  in the VAE decoder, reached through ``decode`` rather than ``forward``) and may leave out outer modules, so the
  parameter is the one not yet filled whose name is, or ends with, the scope's path.

Anything else -- an initializer no rule explains, a parameter no initializer fills, two rules for one parameter, a
shape that does not fit -- is an ExportError naming it; ``load_state_dict(strict=True)`` backs that up. Then the proof:
each model is saved, loaded back from the folder as ``edgediff export`` loads it, and run through the exporter's own
wrappers on random inputs of two shapes against the bundle's graph in ONNX Runtime, the model run in float64
(torch's fp32 strays from it by up to 6e-5 max_rel on the VAE decoder at random latents, ONNX Runtime's by 5e-6); the
folder is moved into place only if every output agrees to ``TOLERANCE`` (max |ort - torch| / max |torch|), else
ParityError and nothing is written. Tokenizer, scheduler config and model_index.json are copied unchanged.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.errors import ExportError, ParityError

# max_rel bound of the proof: the fp32 graph vs the rebuilt model in float64 differ by fp32 rounding only (measured
# 2e-7..5e-6); one wrong or transposed weight, or a config that does not fit the weights, shows up at >1e-3.
TOLERANCE = 1e-5
# pipeline folder <- the bundle graphs that hold its weights
SOURCES = {"text_encoder": ("text_encoder",), "unet": ("unet",), "vae": ("vae_decoder", "vae_encoder")}
COPIED = ("tokenizer", "scheduler", "model_index.json")  # taken from the bundle as they are
# folded initializer (op reading it, input index) -> (parameter suffix, transposed)
FOLDED = {("MatMul", 1): ("weight", True), ("Mul", 1): ("weight", False), ("Add", 1): ("bias", False)}


@dataclass(frozen=True)
class Check:
    """One graph's proof: the rebuilt model vs the bundle's graph on random inputs."""

    component: str
    inputs: dict[str, list[int]]  # input name -> shape
    max_abs: float
    max_rel: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= TOLERANCE


def graph_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[tuple[str, str, int]]]]:
    """(initializer name -> array, initializer name -> [(node name, op type, input index)] of the nodes reading it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                readers.setdefault(name, []).append((node.name, node.op_type, i))
    return inits, readers


def _module_path(node_name: str) -> str:
    """``/m/down_blocks.0/attentions.0/proj_in/MatMul`` -> ``down_blocks.0.attentions.0.proj_in`` (the wrapper's
    ``m`` and the op's own name dropped)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if parts and parts[0] == "m":
        parts = parts[1:]
    return ".".join(parts)


def recover_state_dict(component: str, expected: dict[str, tuple[int, ...]], graphs: list[Path]) -> dict:
    """The torch state dict (name -> float32 array) that ``graphs`` hold for a model whose state dict has the
    names and shapes ``expected`` (module docstring for the rules); ExportError naming anything left over."""
    out: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}  # parameter -> the initializer it came from, for the error messages

    def put(param: str, value: np.ndarray, source: str) -> None:
        if param not in expected:
            raise ExportError(f"{component}: initializer {source} maps to {param!r}, which the model built from the "
                              "bundle's config does not have; the config does not describe these weights")
        if tuple(value.shape) != expected[param]:
            raise ExportError(f"{component}: initializer {source} has shape {tuple(value.shape)} for {param}, the "
                              f"model built from the bundle's config wants {expected[param]}")
        if param in out and not np.array_equal(out[param], value):
            raise ExportError(f"{component}: {param} is held by {where[param]} and {source} with different values")
        out[param], where[param] = np.ascontiguousarray(value, dtype=np.float32), source

    folded = []
    for graph in graphs:
        inits, readers = graph_weights(graph)
        for name, value in inits.items():
            if name.startswith("m."):
                put(name[2:], value, f"{graph.parent.name}:{name}")
            else:
                folded.append((graph, name, value, readers.get(name, [])))
    for graph, name, value, users in folded:  # after the named ones: a folded tensor fills what they left
        source = f"{graph.parent.name}:{name}"
        if not users:
            raise ExportError(f"{component}: initializer {source} is read by no node; cannot tell which weight it is")
        for node_name, op, index in users:  # torch.onnx stores equal tensors once: every reader names a weight
            rule = FOLDED.get((op, index))
            fits = value.ndim == 2 if op == "MatMul" else value.ndim in (2, 3) and set(value.shape[1:]) == {1}
            if rule is None or not fits:
                raise ExportError(f"{component}: initializer {source} {tuple(value.shape)} read as input {index} of "
                                  f"{op} node {node_name}: no rule recovers a weight from that (rebuild.FOLDED)")
            suffix, transposed = rule
            scope = _module_path(node_name)
            wanted = f"{scope}.{suffix}"
            hits = [p for p in expected if p not in out and (p == wanted or p.endswith("." + wanted))]
            if len(hits) != 1:
                raise ExportError(f"{component}: initializer {source} read by {node_name}: {len(hits)} unfilled "
                                  f"parameters end with {wanted!r} ({', '.join(hits[:3]) or 'none'}); expected one")
            w = value.T if transposed else value.reshape(value.shape[0])
            put(hits[0], w, source)
    missing = [p for p in expected if p not in out]
    if missing:
        raise ExportError(f"{component}: {len(missing)} parameter(s) not found in the bundle's graphs, first "
                          f"{missing[0]}; the graphs do not hold this model's weights")
    return out


def build_models(bundle: Path) -> dict:
    """pipeline folder name -> the torch model of the bundle's config with the bundle's weights (strict load)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {c: json.loads((bundle / c / "config.json").read_text(encoding="utf-8"))
               for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    if strip(configs["vae_decoder"]) != strip(configs["vae_encoder"]):
        raise ExportError(f"{bundle}: vae_decoder/config.json and vae_encoder/config.json differ; they must describe "
                          "one AutoencoderKL")
    if configs["unet"].get("_class_name") != "UNet2DConditionModel":
        raise ExportError(f"{bundle}: unet/config.json is a {configs['unet'].get('_class_name')!r}; this tool "
                          "rebuilds UNet2DConditionModel only")
    if configs["vae_decoder"].get("_class_name") != "AutoencoderKL":
        raise ExportError(f"{bundle}: vae_decoder/config.json is a {configs['vae_decoder'].get('_class_name')!r}; "
                          "this tool rebuilds AutoencoderKL only")
    if configs["text_encoder"].get("model_type") != "clip_text_model":
        raise ExportError(f"{bundle}: text_encoder/config.json is model_type "
                          f"{configs['text_encoder'].get('model_type')!r}; this tool rebuilds CLIPTextModel only")
    with torch.device("cpu"):
        models = {
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])),
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae_decoder"]),
        }
    for folder, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = recover_state_dict(folder, expected, [bundle / g / "model.onnx" for g in SOURCES[folder]])
        try:
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
        except RuntimeError as exc:  # recover_state_dict checks the same; this is its backstop
            raise ExportError(f"{folder}: {str(exc).splitlines()[0]}") from None
        model.eval().requires_grad_(False)
    return models


def verify(folder: Path, bundle: Path, seed: int = 0) -> list[Check]:
    """Load the pipeline folder's models as ``edgediff export`` does and compare each exported-graph wrapper with the
    bundle's graph in ONNX Runtime on random inputs of two shapes (batch 1 and 2, square and not)."""
    import onnxruntime as ort
    import torch

    from edgediff.export.components import Geometry, table
    from edgediff.export.parity import compare
    from edgediff.export.pipeline_export import _load
    from edgediff.export.source import inspect_source

    manifest = json.loads((bundle / "edgediff.json").read_text(encoding="utf-8"))
    source = inspect_source(folder)  # the exporter's own check of the folder
    models = {name: _load(source, name) for name in ("text_encoder", "unet", "vae")}
    h = manifest["default_height"] // manifest["vae_scale_factor"]
    w = manifest["default_width"] // manifest["vae_scale_factor"]
    seq = manifest["text_max_length"]
    shapes = (Geometry(1, h, max(1, w - 4), seq), Geometry(2, h, w, seq))
    gen = torch.Generator().manual_seed(seed)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    checks = []
    for name, spec in table().items():
        module = spec.wrap(models).eval().double()  # float64: the reference without torch's own fp32 rounding
        sess = ort.InferenceSession(str(bundle / name / "model.onnx"), so, providers=["CPUExecutionProvider"])
        for g in shapes:
            inputs = spec.inputs(models, g, gen)
            with torch.no_grad():
                ref = module(*(t.double() if t.is_floating_point() else t for t in inputs))
            ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
            ours = sess.run(None, {n: t.numpy() for n, t in zip(spec.input_names, inputs)})
            max_abs, max_rel = compare(ours, ref)
            checks.append(Check(name, {n: list(t.shape) for n, t in zip(spec.input_names, inputs)}, max_abs, max_rel))
        del sess
    return checks


def rebuild(bundle: Path, out: Path, *, overwrite: bool = False, seed: int = 0) -> list[Check]:
    """Write the StableDiffusionPipeline folder of ``bundle`` to ``out`` (staged beside it, moved into place only
    after ``verify`` passes); return the checks. ParityError, with ``out`` untouched, if any check fails."""
    from edgediff.bundle.writer import PARTIAL_SUFFIX, apply_umask, check_output, fsync_tree, move_into_place

    bundle, out = Path(bundle).expanduser(), Path(out).expanduser()
    for need in ("edgediff.json", *COPIED, *(f"{g}/model.onnx" for gs in SOURCES.values() for g in gs)):
        if not (bundle / need).exists():
            raise ExportError(f"{bundle} has no {need}; pass --bundle a bundle made by edgediff export from a "
                              "StableDiffusionPipeline (e.g. runtime/models/shapes)")
    check_output(out, overwrite)  # before the work: a non-empty OUT needs --overwrite, and must be a pipeline
    models = build_models(bundle)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar: our lines replace it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL_SUFFIX, dir=out.parent))
    try:
        for folder, model in models.items():
            model.save_pretrained(tmp / folder, safe_serialization=True)
        del models
        for name in COPIED:
            src = bundle / name
            shutil.copytree(src, tmp / name) if src.is_dir() else shutil.copy2(src, tmp / name)
        checks = verify(tmp, bundle, seed)
        bad = [c for c in checks if not c.passed]
        if bad:
            worst = max(bad, key=lambda c: c.max_rel)
            raise ParityError(f"{worst.component}: the rebuilt model differs from {bundle / worst.component} by "
                              f"max_rel {worst.max_rel:.2e} (> {TOLERANCE:.0e}) on inputs {worst.inputs}; the "
                              f"bundle's config does not describe its weights; nothing was written to {out}")
        apply_umask(tmp)
        fsync_tree(tmp)
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return checks


def main(argv=None) -> int:
    from edgediff.errors import EdgediffError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Where the StableDiffusionPipeline folder is written.")
    ap.add_argument("--bundle", type=Path, default=None, help="The bundle to rebuild (default: the built-in model).")
    ap.add_argument("--overwrite", action="store_true", help="Replace OUT if it is a pipeline folder or bundle.")
    a = ap.parse_args(argv)
    try:
        from edgediff.builtin_model import default_bundle

        bundle = a.bundle or default_bundle()
        checks = rebuild(bundle, a.out, overwrite=a.overwrite)
    except EdgediffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    for c in checks:
        print(f"{c.component:13s} {json.dumps(c.inputs)}: max_abs {c.max_abs:.2e}, max_rel {c.max_rel:.2e}")
    print(f"wrote {a.out}: every graph of {bundle} reproduced within max_rel {TOLERANCE:.0e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
