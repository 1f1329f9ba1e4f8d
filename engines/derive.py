"""Derive a new bundle from a parent bundle by transforming some of its graphs (optimize, quantize).

Every engine command goes through ``derive``: the parent is verified against its manifest first; untouched files
are copied byte for byte; each transformed graph is checked for parity against the parent's graph on real inputs
(``probe.capture``) with the tolerance of its new precision, and the bundle is refused (nothing written) when it
misses; the new manifest records precision, new checksums, the receipts and the chain of transforms. The folder
is staged and renamed into place (``bundle.writer``), so OUT never holds half a bundle; each transform's scratch
files are made inside that staging folder (``scratch``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from edgediff import __version__
from edgediff.bundle import layout
from edgediff.bundle.describe import describe
from edgediff.bundle.manifest import ParityReceipt, Provenance
from edgediff.bundle.reader import Bundle
from edgediff.bundle.writer import check_output, staged_bundle, write_manifest
from edgediff.errors import BundleIntegrityError, EngineError, InputError, ParityError

from .graphs import EXTERNAL_DATA_NAME, save_model
from .isolate import run_isolated
from .scratch import SCRATCH_DIR

Feeds = dict[str, np.ndarray]

# Parity bound per precision of the derived graph, on real inputs. fp32 and fp16: max|a - b| / max|b| (fusions
# reorder sums; fp16 keeps a 10-bit mantissa through ~100 layers). Quantized graphs: ||a - b|| / ||b|| (relative L2),
# since quantization error is spread over every element by design; bounds measured on the trained default model
# (docs/engines.md).
TOLERANCE = {
    "fp32": 1e-3,
    "mixed-fp16": 3e-2,
    "fp16": 3e-2,
    "int8-qdq": 0.15,
    "int8-weights": 0.15,
    "fp8-qdq": 0.15,
    "int4-weights": 0.15,
    "int8-storage": 0.05,
}
METRIC = {p: ("max_rel" if p in ("fp32", "mixed-fp16", "fp16") else "rel_l2") for p in TOLERANCE}


@dataclass(frozen=True)
class Result:
    """What a transform made of one component's graph."""

    precision: str
    optimized_for: str = ""  # see Component.optimized_for
    provider: str = "cpu"  # ONNX Runtime backend that runs the parity check


# (component name, parent graph path, parent bundle, an empty scratch folder) -> the transformed graph and its
# Result. The graph is an onnx.ModelProto held in memory (the scratch folder is deleted when the transform returns),
# or the path of a graph file in the scratch folder, whose external data (graphs.EXTERNAL_DATA_NAME) lies beside it:
# derive moves those files into place, so a graph of any size is never held in this process
Transform = Callable[[str, Path, Bundle, Path], "tuple[object, Result]"]


def begin(src: str | Path, out: str | Path, *, overwrite: bool, tolerance: float | None) -> Bundle:
    """The checks every engine command makes before minutes of work: OUT is free, the tolerance is sane, the
    parent bundle is intact. Returns the parent."""
    check_output(Path(out).expanduser(), overwrite)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not 0 < tolerance < 10):
        raise InputError(f"--tolerance {tolerance!r}; expected a number in (0, 10)")
    return open_parent(src)


def open_parent(src: str | Path) -> Bundle:
    parent = Bundle.open(src)
    problems = [] if parent.derived else parent.verify()  # an optimum export pins nothing to check (trusted as found)
    if problems:
        raise BundleIntegrityError(f"{parent.root}: {problems[0]}" + (f" (and {len(problems) - 1} more)"
                                                                    if len(problems) > 1 else "")
                                   + "; re-export or re-download the bundle before deriving from it")
    return parent


def derive(parent: Bundle, out: str | Path, *, step: str, transform: Transform, components: Sequence[str],
           parity_feeds: Mapping[str, Sequence[Feeds]], overwrite: bool = False, tolerance: float | None = None,
           progress: Callable[[str], None] = lambda msg: None) -> Path:
    """Write the derived bundle to ``out`` and return it. ``step`` is recorded in the provenance
    ("quantize --int8 ..."); ``components`` are transformed, the others copied. ``tolerance`` replaces the
    precision's default parity bound (the receipt records the bound that was applied)."""
    out = Path(out).expanduser()
    check_output(out, overwrite)
    if out.resolve() == parent.root.resolve():
        raise EngineError(f"OUT is the source bundle {parent.root}; write the derived bundle to a new folder")
    m = parent.manifest
    unknown = [c for c in components if c not in m.components]
    if unknown:
        raise EngineError(f"{parent.root} has no component {unknown[0]!r}; it has {sorted(m.components)}")

    with staged_bundle(out, overwrite) as tmp:
        for entry in m.files:  # configs, tokenizer, scheduler: byte for byte
            _copy(parent.root, tmp, entry.path)
        precision, receipts, optimized_for = {}, {}, {}
        for name, comp in m.components.items():
            if name not in components:
                for entry in comp.files:
                    _copy(parent.root, tmp, entry.path)
                precision[name], receipts[name] = comp.precision, comp.parity
                optimized_for[name] = comp.optimized_for
                continue
            progress(f"{name}: {step}")
            scratch = tmp / SCRATCH_DIR / name
            scratch.mkdir(parents=True)
            model, result = transform(name, parent.model_path(name), parent, scratch)
            dst = tmp / layout.graph_path(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(model, Path):  # a saved graph: moved into place with its weights, never loaded here
                _move_graph(model, dst)
                shutil.rmtree(tmp / SCRATCH_DIR)
            else:
                shutil.rmtree(tmp / SCRATCH_DIR)  # before the graph is saved: one copy of its weights on disk at a time
                save_model(model, dst)
            del model
            feeds = list(parity_feeds.get(name, ()))
            if not feeds:
                raise EngineError(f"internal: no parity inputs for {name}")
            progress(f"{name}: parity on {len(feeds)} real input(s)")
            # in a child process: a parity session that exhausts memory is one line, not a CLI killed mid-write
            receipts[name] = run_isolated(
                parity, parent.model_path(name), dst, feeds, what=f"{name}: the parity check at {_shapes(feeds[0])}",
                precision=result.precision, provider=result.provider, optimized=bool(result.optimized_for),
                tolerance=tolerance, reference=f"parent bundle {parent.digest[:12]} ({comp.precision}, ONNX Runtime CPU)")
            if not receipts[name].passed:
                r = receipts[name]
                value = r.max_rel if r.metric == "max_rel" else r.rel_l2
                raise ParityError(f"{name}: {step} changed the outputs by {r.metric} {value:.3g} on real inputs, "
                                  f"over the {result.precision} tolerance {r.tolerance:g}; nothing was written")
            precision[name], optimized_for[name] = result.precision, result.optimized_for
        prov = Provenance(exporter=f"edgediff {__version__}", libraries=_libraries(), source=str(parent.root),
                          source_class=m.provenance.source_class, parent=parent.digest,
                          transforms=(*m.provenance.transforms, step))
        manifest = describe(tmp, prov, parity=receipts, precision=precision)
        comps = {n: dataclasses.replace(c, optimized_for=optimized_for.get(n, "")) for n, c in manifest.components.items()}
        write_manifest(tmp, dataclasses.replace(manifest, components=comps, defaults=m.defaults))
    return out


def parity(parent_graph: Path, derived_graph: Path, feeds: Sequence[Feeds], *, precision: str, provider: str,
           optimized: bool, reference: str, tolerance: float | None = None) -> ParityReceipt:
    """Run both graphs on the same real inputs; max_rel and rel_l2 are over all outputs of all inputs."""
    bound = TOLERANCE[precision] if tolerance is None else float(tolerance)
    # One session at a time: an SD-1.5 UNet session holds several GB, and two at once doubled the peak.
    ref = _session(parent_graph, "cpu", optimized=False)
    names = [o.name for o in ref.get_outputs()]
    expected = [ref.run(names, dict(f)) for f in feeds]
    del ref
    new = _session(derived_graph, provider, optimized=optimized)
    max_abs = max_rel = 0.0
    sq_err = sq_ref = 0.0
    for f, a in zip(feeds, expected):
        b = new.run(names, _cast(new, f))
        for x, y in zip(b, a):
            x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if not np.isfinite(x64).all():
                return ParityReceipt(reference=reference, max_abs=float("inf"), max_rel=float("inf"),
                                     tolerance=bound, inputs=_shapes(feeds[0]),
                                     metric=METRIC[precision], rel_l2=float("inf"))
            err = float(np.max(np.abs(x64 - y64)))
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(float(np.max(np.abs(y64))), 1e-12))
            sq_err += float(np.sum((x64 - y64) ** 2))
            sq_ref += float(np.sum(y64 ** 2))
    return ParityReceipt(reference=reference, max_abs=max_abs, max_rel=max_rel, tolerance=bound,
                         inputs=_shapes(feeds[0]), metric=METRIC[precision],
                         rel_l2=float(np.sqrt(sq_err / max(sq_ref, 1e-30))))


def _session(path: Path, provider: str, *, optimized: bool):
    import onnxruntime as ort

    from edgediff.backends.ort import OrtOptions

    # No memory arena: it keeps each call's peak activations allocated (3.5 GiB more for the SD-1.5 UNet at 512x512
    # here, bench.memory_modes), and a parity check runs a handful of calls, where the arena's speed does not pay.
    options = OrtOptions(graph_optimization_level="disable" if optimized else "all", enable_mem_arena=False)
    try:
        return ort.InferenceSession(str(path), options.session_options(), providers=options.providers(provider))
    except Exception as exc:  # onnxruntime's own exception types
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"ONNX Runtime ({provider}) cannot run {path}: {text}") from None


def _cast(session, feeds: Feeds) -> Feeds:
    """Feeds in the dtypes the graph declares (an fp16 graph with fp16 inputs gets fp16)."""
    kinds = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    return {i.name: np.ascontiguousarray(feeds[i.name], dtype=kinds.get(i.type, None)) for i in session.get_inputs()}


def _shapes(f: Feeds) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in f.items()}


def _move_graph(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    data = src.parent / EXTERNAL_DATA_NAME
    if data.exists():
        os.replace(data, dst.parent / EXTERNAL_DATA_NAME)


def _copy(src_root: Path, dst_root: Path, rel: str) -> None:
    dst = dst_root / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_root / rel, dst)


def _libraries() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
