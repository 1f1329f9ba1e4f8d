"""The one seam between the pipeline and whatever executes a graph."""
from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from ..bundle.manifest import TensorSpec


class Backend(Protocol):
    component: str  # bundle component name, for error messages
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
