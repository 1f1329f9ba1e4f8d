"""Tiny random pipelines of edgediff.export.random_pipeline's presets (SDXL base and refiner, SD3 with and without
T5, FLUX schnell and dev) and their exported bundles, built once per test session however many test modules ask.
Each export is traced: which PyTorch models were alive each time one was loaded and each time ONNX Runtime opened a
graph."""
from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np


@dataclass
class ExportTrace:
    """(event, name, live models) in order: event "load" (before loading source folder ``name``) or "check"
    (when ONNX Runtime opens component ``name``'s graph); live = source folders of PyTorch models still in memory."""

    events: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)


@dataclass(frozen=True)
class Built:
    source: Path
    bundle: Path
    trace: ExportTrace


_built: dict[str, Built] = {}


def tiny_random(tmp_path_factory, preset: str) -> Built:
    if preset not in _built:
        from edgediff.export.random_pipeline import build_random_pipeline

        source = build_random_pipeline(tmp_path_factory.mktemp("src") / preset, preset, seed=0)
        trace = ExportTrace()
        bundle = _traced_export(source, tmp_path_factory.mktemp("bundles") / preset, trace)
        _built[preset] = Built(source, bundle, trace)
    return _built[preset]


def _traced_export(source: Path, out: Path, trace: ExportTrace) -> Path:
    from edgediff.export import parity, pipeline_export

    alive: list[tuple[str, weakref.ref]] = []
    real_load, real_receipt = pipeline_export._load, parity.receipt_for

    def live() -> tuple[str, ...]:
        gc.collect()  # what is left is referenced, not merely uncollected
        return tuple(name for name, ref in alive if ref() is not None)

    def load(src, folder):
        trace.events.append(("load", folder, live()))
        model = real_load(src, folder)
        alive.append((folder, weakref.ref(model)))
        return model

    def receipt_for(model_path, *args, **kwargs):
        trace.events.append(("check", Path(model_path).parent.name, live()))
        return real_receipt(model_path, *args, **kwargs)

    with mock.patch.object(pipeline_export, "_load", load), mock.patch.object(parity, "receipt_for", receipt_for):
        return pipeline_export.export_pipeline(source, out)


class OrtBackend:
    """The Backend protocol (runtime/backends/base.py) over an ONNX Runtime CPU session: the conditioning code sees
    only ``component``, ``inputs``, ``outputs`` and ``run``."""

    def __init__(self, bundle, name: str):
        import onnxruntime as ort

        comp = bundle.component(name)
        self.component, self.inputs, self.outputs = name, comp.inputs, comp.outputs
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self._session = ort.InferenceSession(str(bundle.model_path(name)), so, providers=["CPUExecutionProvider"])
        self.calls: list[tuple[int, ...]] = []  # input_ids shapes, to count encoder runs

    def run(self, feeds) -> dict[str, np.ndarray]:
        self.calls.append(tuple(feeds["input_ids"].shape))
        return dict(zip((s.name for s in self.outputs), self._session.run(None, dict(feeds))))

    def close(self) -> None:
        self._session = None


tiny_sdxl = tiny_random  # the SDXL tests' name for it
