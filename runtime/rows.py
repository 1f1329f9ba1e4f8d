"""Running a graph a few batch rows at a time: low-memory mode's denoiser calls.

A denoiser's activations grow with its batch: SDXL's UNet at 1024x1024 holds (rows, 10, 4096, 4096) float32
attention scores, 0.67 GB a row, and classifier-free guidance doubles the rows. The graph computes every row on
its own (convolutions, group norm and attention are per sample; runtime/batching.py relies on the same fact), so
calling it on slices of the batch and concatenating the outputs gives the same arrays with a fraction of the
activation memory, at the cost of smaller matrix products.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .backends.base import Backend

# Backends whose graphs take any batch the bundle's symbolic axis allows. A TensorRT engine (native, or ONNX
# Runtime's TensorRT provider) takes the batches of the profile it was built with, which may be static at 2N with
# guidance, so it keeps whole batches.
ROW_BACKENDS = ("cpu", "cuda")


def run_in_rows(run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], backend: Backend,
                feeds: Mapping[str, np.ndarray], max_rows: int | None) -> list[np.ndarray]:
    """``run(feeds)`` (outputs in ``backend.outputs`` order), at most ``max_rows`` batch rows a call. Inputs split
    are those whose first axis is the graph's symbolic batch axis (the first input's); a graph whose batch axis is
    fixed (a static-shape bundle or engine) runs whole, as does a batch that already fits."""
    if max_rows is None:  # the default mode: nothing to look at on the per-step path
        return run(feeds)
    first = backend.inputs[0].shape[:1] if backend.inputs else ()
    axis = first[0] if first and isinstance(first[0], str) else None
    split = [s.name for s in backend.inputs if s.rank and s.shape[0] == axis and s.name in feeds]
    rows = feeds[split[0]].shape[0] if split else 0
    if axis is None or rows <= max_rows or any(np.shape(feeds[name])[:1] != (rows,) for name in split):
        return run(feeds)
    parts = [run({k: (v[i:i + max_rows] if k in split else v) for k, v in feeds.items()})
             for i in range(0, rows, max_rows)]
    return [np.concatenate([p[j] for p in parts]) if s.rank and s.shape[0] == axis else parts[0][j]
            for j, s in enumerate(backend.outputs)]
