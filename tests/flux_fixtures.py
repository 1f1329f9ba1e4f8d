"""Tiny random FLUX.1 pipelines (schnell and dev) and their exported bundles, built once per test session however
many test modules ask. The export is traced (tests/sdxl_fixtures.py's tracer): which PyTorch models were alive each
time one was loaded and each time ONNX Runtime opened a graph."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl_fixtures import ExportTrace, _traced_export

PRESETS = ("tiny-flux-schnell", "tiny-flux-dev")


@dataclass(frozen=True)
class Built:
    source: Path
    bundle: Path
    trace: ExportTrace


_built: dict[str, Built] = {}


def tiny_flux(tmp_path_factory, preset: str) -> Built:
    if preset not in _built:
        from edgediff.export.random_pipeline import build_random_pipeline

        source = build_random_pipeline(tmp_path_factory.mktemp("src") / preset, preset, seed=0)
        trace = ExportTrace()
        bundle = _traced_export(source, tmp_path_factory.mktemp("bundles") / preset, trace)
        _built[preset] = Built(source, bundle, trace)
    return _built[preset]
