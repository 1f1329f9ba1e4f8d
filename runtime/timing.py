"""Spans of wall time per stage and step: the raw material of ``result.timings``, the bench harness's per-stage
statistics and overhead figure, and Chrome traces."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class Span:
    name: str  # stage: tokenize, text_encoder, unet, scheduler, vae_encode, vae_decode, postprocess, step, ...
    start: float  # perf_counter seconds
    end: float
    step: int | None = None  # denoising step index for per-step spans

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Stopwatch:
    spans: list[Span] = field(default_factory=list)

    @contextmanager
    def span(self, name: str, step: int | None = None) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append(Span(name, t0, time.perf_counter(), step))

    def totals(self) -> dict[str, float]:
        """Seconds per stage name, summed over steps."""
        out: dict[str, float] = {}
        for s in self.spans:
            out[s.name] = out.get(s.name, 0.0) + s.seconds
        return out
