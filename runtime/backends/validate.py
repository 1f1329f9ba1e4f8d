"""Check feeds against a component's I/O spec before every call, so that a mismatch names the component and the
input instead of surfacing from deep inside ONNX Runtime or TensorRT."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import BackendError
from ..bundle.manifest import TensorSpec


def check_feeds(component: str, specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray],
                bounds: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Raise BackendError on missing/unexpected names, wrong dtype or rank, fixed-dim mismatch, a symbolic dim that
    takes two values, a dim outside ``bounds[name] = (min, max)``, or a non-contiguous array."""
    names = {s.name for s in specs}
    missing = [n for n in names if n not in feeds]
    if missing:
        raise BackendError(f"{component}: missing input(s) {sorted(missing)}; it takes {sorted(names)}")
    extra = [n for n in feeds if n not in names]
    if extra:
        raise BackendError(f"{component}: unexpected input(s) {sorted(extra)}; it takes {sorted(names)}")
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        a = feeds[spec.name]
        if not isinstance(a, np.ndarray):
            raise BackendError(f"{component}.{spec.name}: expected a numpy array, got {type(a).__name__}")
        if a.dtype != np.dtype(spec.dtype):
            raise BackendError(f"{component}.{spec.name}: dtype {a.dtype}, expected {spec.dtype}")
        if a.ndim != spec.rank:
            raise BackendError(f"{component}.{spec.name}: rank {a.ndim} {a.shape}, expected rank {spec.rank} {spec.shape}")
        if not a.flags.c_contiguous:
            raise BackendError(f"{component}.{spec.name}: array is not C-contiguous; pass np.ascontiguousarray(x)")
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int):
                if want != got:
                    raise BackendError(f"{component}.{spec.name}: dim {axis} is {got}, expected {want} (shape {spec.shape})")
                continue
            if want in seen and seen[want][0] != got:
                other_value, other_input = seen[want]
                raise BackendError(f"{component}.{spec.name}: dim {axis} ({want}) is {got} but {other_input} has "
                                   f"{want}={other_value}; they must agree")
            seen.setdefault(want, (got, spec.name))
            if bounds and want in bounds:
                lo, hi = bounds[want]
                if not lo <= got <= hi:
                    raise BackendError(f"{component}.{spec.name}: {want}={got} is outside [{lo}, {hi}] this engine supports")
