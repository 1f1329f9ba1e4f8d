"""Running one component for a pipeline stage: feeds cast to the graph's declared dtypes, float outputs back to
float32, and every float output checked where it is made, so a NaN is reported by the component that produced it
(a NaN from the text encoder must not surface as "latents became NaN at step 1")."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .backends.base import Backend
from .errors import NonFiniteError


def run_component(backend: Backend, feeds: Mapping[str, np.ndarray], *, precision: str = "fp32") -> list[np.ndarray]:
    """Outputs of ``backend`` in its declared order; raises NonFiniteError naming the component on NaN/Inf."""
    specs = {s.name: s for s in backend.inputs}
    cast = {k: np.ascontiguousarray(v, dtype=specs[k].dtype) if k in specs else v for k, v in feeds.items()}
    outs = backend.run(cast)
    result = []
    for s in backend.outputs:
        a = outs[s.name]
        if a.dtype.kind == "f":
            a = np.asarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise NonFiniteError(f"{backend.component} produced NaN/Inf in {s.name!r} "
                                     f"({precision_advice(precision)})")
        result.append(a)
    return result


def precision_advice(precision: str) -> str:
    """What to try when a graph of this precision produced NaN/Inf."""
    if precision == "fp32":
        return ("an fp32 graph: its weights or inputs are broken; verify the bundle (edgediff inspect --verify) "
                "or re-export it")
    return f"precision {precision} overflowed: use the fp32 bundle for this component"
