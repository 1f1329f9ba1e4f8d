"""Session creation time and run time of one graph under ONNX Runtime's optimization levels, side by side.

    edgediff bench session-levels BUNDLE_A [BUNDLE_B ...] [--component unet] [--size 256x256] [--repeat 2]

For each bundle the component's graph is opened at ``all`` (the runtime's level for exported graphs, and for the VAE
graphs saved by ``edgediff optimize --target cpu``) and, for pre-optimized graphs, also at ``disable`` (the runtime's
level for their denoiser and text encoders); each
configuration is created and run twice on the same random feeds, rounds interleaved so that drift on a shared
machine hits every configuration alike. Ratios are against the first configuration.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np


def _feeds(component, height: int, width: int, factor: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    values = {"batch": batch, "height": height // factor, "width": width // factor, "image_height": height,
              "image_width": width, "sequence": 77}
    feeds = {}
    for spec in component.inputs:
        shape = tuple(d if isinstance(d, int) else values[d] for d in spec.shape)
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, np.dtype(spec.dtype))
        elif np.dtype(spec.dtype).kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
    return feeds


def measure(bundles: Sequence[str | Path], component: str, height: int, width: int,
            repeat: int) -> dict[str, list[tuple[float, float]]]:
    """configuration label -> [(create seconds, run seconds)] per round."""
    import onnxruntime as ort

    from edgediff.backends.ort import OrtOptions
    from edgediff.bundle.reader import Bundle

    configs = []
    for path in bundles:
        b = Bundle.open(path)
        comp = b.component(component)
        levels = ["disable", "all"] if comp.optimized_for else ["all"]
        for level in levels:
            configs.append((f"{b.root.name} level={level}", b.model_path(component), level,
                            _feeds(comp, height, width, b.manifest.vae_scale_factor)))
    results: dict[str, list[tuple[float, float]]] = {c[0]: [] for c in configs}
    for _ in range(repeat):
        for label, graph, level, feeds in configs:
            t0 = time.perf_counter()
            s = ort.InferenceSession(str(graph), OrtOptions(graph_optimization_level=level).session_options(),
                                     providers=["CPUExecutionProvider"])
            t1 = time.perf_counter()
            s.run(None, feeds)
            t2 = time.perf_counter()
            results[label].append((t1 - t0, t2 - t1))
            del s
    return results


def table(results: dict[str, list[tuple[float, float]]]) -> str:
    """Medians per configuration, and their ratios to the first configuration."""
    repeat = len(next(iter(results.values())))
    base_create = base_run = None
    out = [f"{'configuration':<40}{'create (s)':>12}{'ratio':>8}{'run (s)':>10}{'ratio':>8}   median of {repeat}"]
    for label, rows in results.items():
        create = float(np.median([r[0] for r in rows]))
        run = float(np.median([r[1] for r in rows]))
        base_create, base_run = base_create or create, base_run or run
        out.append(f"{label:<40}{create:>12.2f}{create / base_create:>8.3f}{run:>10.2f}{run / base_run:>8.3f}")
    return "\n".join(out)
