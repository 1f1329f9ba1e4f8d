"""Measure bundles over the cartesian product of option lists: what ``edgediff bench`` (one value per list) and
``edgediff bench sweep`` run. Everything that can be refused is refused before the first measurement."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edgediff.errors import InputError

from . import report
from .runner import BenchConfig, cold_start, measure


@dataclass(frozen=True)
class Axes:
    """The lists whose product is measured on every bundle. ``None`` in a list means the bundle's own value: its
    recommended step count (``Bundle.default_steps``), its native size, its scheduler."""

    backend: Sequence[str] = ("cpu",)
    steps: Sequence[int | None] = (None,)
    size: Sequence[tuple[int, int] | None] = (None,)  # (height, width)
    batch: Sequence[int] = (1,)
    scheduler: Sequence[str | None] = (None,)

    def product(self):
        return itertools.product(self.backend, self.steps, self.size, self.batch, self.scheduler)


@dataclass(frozen=True)
class Settings:
    """What every configuration shares."""

    guidance: float
    warmup: int = 1
    runs: int = 3
    seed: int = 0
    low_memory: bool = False
    compare: str | None = None  # "diffusers": also time the source pipeline in a worker process
    reference: Path | None = None  # the diffusers folder for compare; default: the source the bundle records
    profile_ops: int = 0
    cold: bool = False  # also time a fresh process per configuration


@dataclass
class Result:
    rows: list[dict]
    environment: dict
    spans: list = field(default_factory=list)  # the last generation's spans, for the trace


def run(bundles: Sequence[str | Path], axes: Axes, settings: Settings) -> Result:
    """Bundles one after another (each closed before the next loads: an SD-1.5 bundle and its variants do not fit in
    memory together); within a bundle, every configuration of ``axes``."""
    from edgediff import Pipeline
    from edgediff.bundle.reader import Bundle

    check_backends(axes.backend)
    variants = [Bundle.open(b) for b in bundles]  # every bundle is checked before the first measurement
    if settings.compare:
        from .compare import check_reference

        for v in variants:
            check_reference(_reference(v, settings.reference))
    rows, spans, first, first_backends = [], [], None, []
    for variant in variants:
        pipes: dict = {}
        try:
            for backend, steps, size, batch, scheduler in axes.product():
                height, width = size if size else (None, None)
                cfg = BenchConfig(bundle=str(variant.root), backend=backend,
                                  steps=steps if steps is not None else variant.default_steps,
                                  height=height, width=width, batch=batch, guidance=settings.guidance,
                                  scheduler=scheduler, warmup=settings.warmup, runs=settings.runs, seed=settings.seed,
                                  low_memory=settings.low_memory)
                load = None
                if backend not in pipes:
                    t0 = time.perf_counter()
                    pipes[backend] = Pipeline.load(variant.root, backend=backend, low_memory=settings.low_memory)
                    load = time.perf_counter() - t0
                row = measure(cfg, pipe=pipes[backend], profile_ops=settings.profile_ops)
                row.load_seconds = load if load is not None else float("nan")  # loaded once per backend
                row.variant = report.variant_info(variant)
                if settings.cold:
                    row.cold_start = cold_start(cfg)
                if settings.compare:
                    from .compare import compare

                    row.compare = compare(cfg, pipes[backend], _reference(variant, settings.reference))
                rows.append(row.to_dict())
                spans = row.trace_spans
        finally:
            if first is None and pipes:
                first, first_backends = next(iter(pipes.values())), sorted(pipes)
            for p in pipes.values():
                p.close()
    from .environment import record

    env = record(providers=first_backends, bundle_digest=first.bundle.digest,
                 precision=first.bundle.component("unet").precision)
    return Result(rows=rows, environment=env, spans=list(spans))


def check_backends(names: Sequence[str]) -> None:
    from edgediff.backends import BACKENDS

    for b in names:
        if b not in BACKENDS:
            raise InputError(f"unknown backend {b!r}; expected one of {sorted(BACKENDS)}")


def _reference(bundle, reference: Path | None) -> Path:
    """The diffusers folder ``--compare`` runs: ``--reference``, else the source the bundle was exported from."""
    if reference is not None:
        return Path(reference)
    source = bundle.manifest.provenance.source
    if not source:
        raise InputError(f"{bundle.root} does not record its source pipeline; pass --reference DIR")
    return Path(source)
