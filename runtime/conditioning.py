"""What the denoiser gets besides the latents and the timestep, and the seam that makes it per model family."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .components import Components
    from .request import GenerationRequest
    from .timing import Stopwatch


@dataclass(frozen=True)
class Conditioning:
    """Everything the denoiser gets besides the latents and the timestep. SDXL's pooled text embeddings and time
    ids, or LCM's guidance embedding, become more entries of ``extra`` — the loop does not change."""

    encoder_hidden_states: np.ndarray  # (2N, seq, D) float32 [uncond; cond] when guided, else (N, seq, D)
    guided: bool
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more denoiser inputs, batch-aligned with the above


class TextConditioner(Protocol):
    """Turns a request's prompts into a ``Conditioning``: one implementation per model family (runtime/families/),
    chosen once when the pipeline is loaded. ``options`` names the family's own call arguments (SDXL's
    ``prompt_2``, micro-conditioning...); ``prepare`` checks them before any work and returns what the conditioner
    reads back from ``GenerationRequest.extra``."""

    options: frozenset[str]

    def prepare(self, options: dict[str, Any], *, img2img: bool) -> dict[str, Any]: ...

    def __call__(self, request: "GenerationRequest", components: "Components", watch: "Stopwatch") -> Conditioning: ...
