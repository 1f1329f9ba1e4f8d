"""LoRAs for a bundle, as fused initializer values per component: what a backend is given instead of the stored
weights (ONNX Runtime: initializer overrides; TensorRT: refit). No graph is rewritten and no file is written.

    weights = lora_weights(bundle, [LoraSpec("style.safetensors", 0.8)])
    # {"unet": {"onnx::MatMul_2370": <(in, out) float32>, ...}, "text_encoder": {...}}

Everything is checked before any array is computed: the bundle's precision (quantized weights cannot take a
float delta), its weights maps, each file's format, names and shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from ..errors import BundleError, InputError
from .formats import LoraFile, LoraLayer, read_lora
from .fuse import fused
from .onnx_weights import GraphWeights
from .resolve import ModelTable, resolve
from .weights_map import LORA_COMPONENTS, WeightsMap, load_weights_map

if TYPE_CHECKING:
    from ..bundle.reader import Bundle

# precisions whose weights are not plain floats (Q/DQ, integer storage): a float delta cannot be added at run time
QUANTIZED = ("int8-qdq", "fp8-qdq", "int8-weights", "int4-weights", "int8-storage")
MAX_WEIGHT = 1e3  # |weight| above this is a typo, not a strength


@dataclass(frozen=True)
class LoraSpec:
    """One requested LoRA: its ``.safetensors`` file and its weight (the strength diffusers' adapter weight and
    A1111's ``<lora:name:0.8>`` give)."""

    path: Path
    weight: float = 1.0

    def __str__(self) -> str:
        return f"{self.path.name}:{self.weight:g}"


def lora_specs(loras: Mapping[Any, Any] | Iterable[LoraSpec] | None) -> tuple[LoraSpec, ...]:
    """``{"file.safetensors": 0.8, ...}`` (or LoraSpecs) as checked LoraSpecs, in the given order."""
    if loras is None:
        return ()
    if isinstance(loras, Mapping):
        items = list(loras.items())
    else:
        try:
            items = [(s.path, s.weight) if isinstance(s, LoraSpec) else s for s in loras]
        except TypeError:
            raise InputError(f"loras must map LoRA files to weights, e.g. {{'style.safetensors': 0.8}}, not "
                             f"{type(loras).__name__}") from None
    specs = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise InputError(f"loras must map LoRA files to weights, e.g. {{'style.safetensors': 0.8}}; got {item!r}")
        path, weight = item
        if not isinstance(path, (str, Path)):
            raise InputError(f"a LoRA is given by its file path, not {type(path).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or abs(weight) > MAX_WEIGHT:
            raise InputError(f"LoRA {path}: weight {weight!r}; expected a finite number (typically 0 to 1.5)")
        specs.append(LoraSpec(Path(path).expanduser(), float(weight)))
    seen = set()
    for s in specs:
        key = s.path.resolve()
        if key in seen:
            raise InputError(f"LoRA {s.path} is given twice; give it once with the sum of the weights")
        seen.add(key)
    return tuple(specs)


def parse_lora_option(text: str) -> LoraSpec:
    """``FILE[:WEIGHT]`` (the CLI's ``--lora``): the weight after the last colon when it is a number, else 1."""
    path, sep, tail = text.rpartition(":")
    try:
        weight = float(tail) if sep else None
    except ValueError:  # a colon inside the path
        weight = None
    if weight is None:
        path, weight = text, 1.0
    return lora_specs([(path, weight)])[0]  # the weight checked here: finite, bounded


def check_hot_swappable(bundle: "Bundle", components: Iterable[str]) -> None:
    """Refuse components whose stored weights cannot take a float delta at run time."""
    for name in components:
        comp = bundle.component(name)
        if comp.precision in QUANTIZED:
            raise BundleError(f"{name} is {comp.precision}: a LoRA cannot be added to quantized weights at run time; "
                              "fuse at export (edgediff export --lora) and re-quantize")
        if comp.optimized_for:
            raise BundleError(f"{name} was optimized for ONNX Runtime {comp.optimized_for!r}, which may repack its "
                              "weights: hot-swap LoRAs on the exported bundle, or fuse them at export and optimize")


def model_name(bundle: "Bundle") -> str:
    return f"this {bundle.manifest.family} bundle"


def read_loras(specs: Iterable[LoraSpec]) -> list[tuple[LoraSpec, LoraFile]]:
    return [(s, read_lora(s.path)) for s in specs]


@dataclass(frozen=True)
class AppliedLoras:
    """What a pipeline runs with: the LoRAs, and per component the fused weights they give and what those were
    computed from (``sources``: each contributing file's path, weight, size and mtime), so a swap recomputes and
    reopens only the components whose sources changed."""

    specs: tuple[LoraSpec, ...] = ()
    weights: dict[str, "FusedWeights"] = field(default_factory=dict)
    sources: dict[str, tuple] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {str(s.path): s.weight for s in self.specs}


def lora_weights(bundle: "Bundle", loras: Mapping[Any, Any] | Iterable[LoraSpec] | None, *,
                 verify: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """component -> initializer name -> fused weights (the initializer's layout and dtype), for every weight
    the LoRAs change; {} for no LoRAs. Every LoRA is checked before any weight is computed."""
    return {c: dict(w) for c, w in apply_loras(bundle, loras, verify=verify).weights.items()}


def apply_loras(bundle: "Bundle", loras: Mapping[Any, Any] | Iterable[LoraSpec] | None,
                previous: AppliedLoras | None = None, *, verify: bool = True) -> AppliedLoras:
    """The weights for ``loras``, reusing ``previous``'s arrays for components whose sources did not change.
    Everything is read and checked before any weight is computed."""
    specs = lora_specs(loras)
    if not specs:
        return AppliedLoras()
    files = read_loras(specs)
    components = sorted({layer.component for _, f in files for layer in f.layers}, key=LORA_COMPONENTS.index)
    present = [c for c in components if bundle.has(c)]
    check_hot_swappable(bundle, present)
    maps = {c: load_weights_map(bundle, c, verify=verify) for c in present}
    tables = {c: ModelTable(c, {**{p: e.shape for p, e in m.weights.items()}, **{p: None for p in m.unmapped}})
              for c, m in maps.items()}
    plan: dict[str, dict[str, list[tuple[LoraLayer, float]]]] = {}  # component -> param -> terms
    sources: dict[str, list] = {}
    for spec, f in files:
        for hit in resolve(f, tables, model=model_name(bundle)):
            plan.setdefault(hit.layer.component, {}).setdefault(hit.param, []).append(
                (hit.layer, spec.weight * hit.layer.scale))
        for c in sorted({layer.component for layer in f.layers}):
            sources.setdefault(c, []).append(_source(spec))
    previous = previous or AppliedLoras()
    weights, done = {}, {}
    for c, params in plan.items():
        done[c] = tuple(sources[c])
        if previous.sources.get(c) == done[c] and c in previous.weights:
            weights[c] = previous.weights[c]  # the same object: the component is not reopened
        else:
            weights[c] = _component_weights(bundle, c, maps[c], params, verify)
    return AppliedLoras(specs=specs, weights=weights, sources=done)


def _source(spec: LoraSpec) -> tuple:
    st = spec.path.stat()
    return (str(spec.path.resolve()), spec.weight, st.st_size, st.st_mtime_ns)


def _component_weights(bundle: "Bundle", component: str, wmap: WeightsMap,
                       params: dict[str, list[tuple[LoraLayer, float]]], verify: bool) -> "FusedWeights":
    """The component's fused weights, every name and shape checked now; the arrays are computed when a backend
    first reads them."""
    graph = GraphWeights(bundle.model_path(component, verify=verify))
    jobs = []
    for param, terms in params.items():
        entry = wmap.weights[param]
        shared = [p for p in wmap.sharing(entry.initializer) if p != param]
        if shared:
            raise BundleError(f"{component}.{param} and {shared[0]} share one weight in the exported graph (equal "
                              "values, merged by the exporter); a LoRA on one of them cannot be added at run time: "
                              "fuse it at export (edgediff export --lora)")
        info = graph.info(entry.initializer)
        want = entry.shape[::-1] if entry.transposed else entry.shape
        if info is None or info.shape != tuple(want):
            found = "missing" if info is None else f"{info.shape}"
            raise BundleError(f"{component}: initializer {entry.initializer!r} for {param} is {found} in the graph, "
                              f"its weights map says {tuple(want)}; the map does not describe this graph: "
                              "re-export the bundle")
        jobs.append((entry, info, terms))
    return FusedWeights(graph, jobs)


class FusedWeights(Mapping[str, np.ndarray]):
    """initializer name -> fused weights of one component (the graph's layout and dtype), computed on first read
    and dropped by ``release()``: once ONNX Runtime has copied them into its session, holding them would keep a
    second copy of every changed weight (measured: 3.1 GiB for a LoRA on every UNet layer of SD 1.5). A component
    opened again later (low-memory mode, a failed swap put back) recomputes them — the same inputs in the same
    order, so the same bits."""

    def __init__(self, graph: GraphWeights, jobs: list):
        self._graph = graph
        self._jobs = jobs  # (weights-map entry, initializer info, [(layer, factor), ...]) per changed weight
        self._arrays: dict[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self._computed()[name]

    def __iter__(self):
        return (entry.initializer for entry, _, _ in self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def release(self) -> None:
        self._arrays = None

    def _computed(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            out = {}
            for entry, info, terms in self._jobs:
                base = self._graph.read_copy(entry.initializer)  # private copy, the graph's layout
                w = fused(base, terms, entry.shape, transposed=entry.transposed, own=True)  # float32
                out[entry.initializer] = w if w.dtype == info.dtype else w.astype(info.dtype)
            self._arrays = out
        return self._arrays
