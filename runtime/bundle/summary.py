"""A bundle described for people (``edgediff inspect``): components, I/O signatures, precisions, sizes, parity
receipts and provenance, one line each."""
from __future__ import annotations

from typing import Iterator

from .manifest import Component
from .reader import Bundle
from .schema import REOPTIMIZE_AT_LOAD


def summary_lines(b: Bundle) -> Iterator[str]:
    m = b.manifest
    yield f"bundle   {b.root}"
    yield (f"manifest {'derived from an optimum export (no edgediff.json)' if b.derived else 'edgediff.json'}"
           f"  sha256 {b.digest[:16]}")
    yield (f"family   {m.family}  prediction {m.prediction_type}  default {m.default_width}x{m.default_height}  "
           f"latents {m.latent_channels}ch /{m.vae_scale_factor}  scaling_factor {m.scaling_factor:g}")
    d = m.defaults
    if d.steps is not None or d.guidance_scale is not None:
        yield (f"defaults steps {d.steps if d.steps is not None else '-'}  guidance "
               f"{d.guidance_scale if d.guidance_scale is not None else '-'}  (recommended; used when a call names none)")
    yield f"source   {m.provenance.source_class or '?'} {m.provenance.source}  by {m.provenance.exporter}"
    for step in m.provenance.transforms:
        yield f"derived  {step}"
    for comp in m.components.values():
        yield from _component_lines(comp)


def _component_lines(comp: Component) -> Iterator[str]:
    yield f"\n{comp.name}  [{comp.precision}]  {human_size(comp.size)}  {comp.model}"
    for s in comp.inputs:
        yield f"  in   {s.name:<22} {s.dtype:<8} {_shape(s.shape)}"
    for s in comp.outputs:
        yield f"  out  {s.name:<22} {s.dtype:<8} {_shape(s.shape)}"
    r = comp.parity
    if r is not None:
        verdict = "ok" if r.passed else "FAILED"
        value = r.max_rel if r.metric == "max_rel" else r.rel_l2
        shown = "?" if value is None else f"{value:.2e}"
        yield (f"  parity {verdict}: {r.metric} {shown} (tol {r.tolerance:.2g})  max_abs {r.max_abs:.2e}  "
               f"vs {r.reference}")
    if comp.optimized_for:
        how = ("re-optimized at load for this CPU's convolution layout" if comp.name.startswith(REOPTIMIZE_AT_LOAD)
               else "opened with graph optimizations off")
        yield f"  optimized for ONNX Runtime {comp.optimized_for} ({how})"


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
