"""Measure bundles over the cartesian product of option lists: what ``edgediff bench`` (one value per list) and
``edgediff bench sweep`` run. Everything that can be refused is refused before the first measurement."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from edgediff.bundle.manifest import MANIFEST_NAME
from edgediff.errors import InputError

from . import report
from .runner import BenchConfig, cold_start, measure, op_profile


@dataclass(frozen=True)
class Axes:
    """The lists whose product is measured on every bundle. ``None`` in a list means the bundle's own value: its
    recommended step count (``Bundle.default_steps``), its native size, its scheduler."""

    backend: Sequence[str] = ("cpu",)
    steps: Sequence[int | None] = (None,)
    size: Sequence[tuple[int, int] | None] = (None,)  # (height, width)
    batch: Sequence[int] = (1,)
    scheduler: Sequence[str | None] = (None,)
    # speed options, each measured against the plain run of every configuration (bench/quality.py); () = none
    levers: Sequence = ()

    def product(self):
        return itertools.product(self.backend, self.steps, self.size, self.batch, self.scheduler)


@dataclass(frozen=True)
class Settings:
    """What every configuration shares."""

    guidance: float | None = None  # None: each bundle's recommended guidance (Bundle.default_guidance; Turbo: 0)
    warmup: int = 1
    runs: int = 3
    seed: int = 0
    low_memory: bool = False
    compare: str | None = None  # "diffusers": also time the source pipeline in a worker process
    reference: Path | None = None  # the diffusers folder for compare; default: the source the bundle records
    compare_order: str = "auto"  # "alternate" run by run, "sequential" (all of ours, then theirs), or "auto"
    profile_ops: int = 0
    cold: bool = False  # also time a fresh process per configuration
    control_image: Path | None = None  # ControlNet: every generation with this control image (runtime/controlnet.py)
    controlnets: tuple[str, ...] = ()  # which of the bundle's ControlNets (empty: its only one)


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
    for v in variants:
        check_text_to_image(v)
    if axes.levers:
        check_lever_settings(settings)
        for v in variants:
            _check_levers(v, axes, settings)
    if settings.compare:
        from .compare import check_reference

        for v in variants:
            check_reference(_reference(v, settings.reference), v.manifest.family)
    rows, spans = [], []
    for variant in variants:
        pipes: dict = {}
        guidance = settings.guidance if settings.guidance is not None else variant.default_guidance
        try:
            for backend, steps, size, batch, scheduler in axes.product():
                height, width = size if size else (None, None)
                cfg = BenchConfig(bundle=str(variant.root), backend=backend,
                                  steps=steps if steps is not None else variant.default_steps,
                                  height=height, width=width, batch=batch, guidance=guidance,
                                  scheduler=scheduler, warmup=settings.warmup, runs=settings.runs, seed=settings.seed,
                                  low_memory=settings.low_memory,
                                  control_image=None if settings.control_image is None else str(settings.control_image),
                                  controlnets=tuple(settings.controlnets))
                load = None
                if backend not in pipes:
                    t0 = time.perf_counter()
                    pipes[backend] = Pipeline.load(variant.root, backend=backend, low_memory=settings.low_memory)
                    load = time.perf_counter() - t0
                if axes.levers:
                    from .quality import measure_levers

                    for lever_row in measure_levers(cfg, pipes[backend], axes.levers):
                        lever_row.load_seconds = load if load is not None else float("nan")
                        load = None  # the first row of a backend carries its load time, as below
                        lever_row.variant = report.variant_info(variant)
                        rows.append(lever_row.to_dict())
                    continue
                row = measure(cfg, pipe=pipes[backend])
                row.load_seconds = load if load is not None else float("nan")  # loaded once per backend
                row.variant = report.variant_info(variant)
                if settings.cold:
                    row.cold_start = cold_start(cfg)
                if settings.compare:
                    from .compare import choose_order, compare

                    order = choose_order(settings.compare_order, row.variant["bytes"])
                    # sequential: our pipeline is closed before diffusers loads (the next configuration reloads it)
                    release = lambda b=backend: pipes.pop(b).close()  # noqa: E731
                    row.compare = compare(cfg, pipes[backend], _reference(variant, settings.reference), order=order,
                                          release=release)
                if settings.profile_ops:
                    # the profiler runs a second pipeline (its sessions opened with profiling on): ours is closed
                    # first, as an SDXL pipeline and a profiling one did not fit in 23 GiB together (the OOM killer
                    # ended the run); the next configuration reloads it
                    ours = pipes.pop(backend, None)
                    if ours is not None:
                        ours.close()
                    row.ops = op_profile(cfg, settings.profile_ops)
                rows.append(row.to_dict())
                spans = row.trace_spans
        finally:
            for p in pipes.values():
                p.close()
    from .environment import record

    first = variants[0]
    env = record(providers=sorted(set(axes.backend)), bundle_digest=first.digest,
                 precision=first.component(first.denoiser).precision)
    return Result(rows=rows, environment=env, spans=list(spans))


# Families that only refine an image (no text-to-image): bench times text-to-image generations
IMAGE_TO_IMAGE_ONLY = frozenset({"sdxl-refiner"})


def check_text_to_image(bundle) -> None:
    family = bundle.manifest.family
    if family in IMAGE_TO_IMAGE_ONLY:
        raise InputError(f"{bundle.root} is a {family} bundle: it refines images and bench times text-to-image; "
                         "bench the base bundle (e.g. sdxl) instead")


def check_lever_settings(settings: Settings) -> None:
    """Speed levers are timed against the plain run in this process; the options that time something else are
    refused with them rather than measured for the plain run alone."""
    for name, flag in (("--compare", settings.compare), ("--cold-start", settings.cold),
                       ("--profile-ops", settings.profile_ops)):
        if flag:
            raise InputError(f"{name} does not combine with the speed levers (--decoder, --cfg-cutoff, --vae-tiling, "
                             f"--cache-interval); run it in a sweep of its own")


def _check_levers(bundle, axes: Axes, settings: Settings) -> None:
    """Every configuration's lever calls validated by the bundle's pipeline opened without sessions (``low_memory``
    opens none until a stage runs; ``verify=False``: the measurement's own load verifies), before any measurement."""
    from edgediff import Pipeline

    from .quality import check_levers

    guidance = settings.guidance if settings.guidance is not None else bundle.default_guidance
    for backend in dict.fromkeys(axes.backend):
        probe = Pipeline.load(bundle.root, backend=backend, low_memory=True, verify=False)
        try:
            for _, steps, size, batch, scheduler in axes.product():
                height, width = size if size else (None, None)
                cfg = BenchConfig(bundle=str(bundle.root), backend=backend,
                                  steps=steps if steps is not None else bundle.default_steps, height=height,
                                  width=width, batch=batch, guidance=guidance, scheduler=scheduler,
                                  warmup=settings.warmup, runs=settings.runs, seed=settings.seed)
                check_levers(probe, cfg, axes.levers)
        finally:
            probe.close()


def check_backends(names: Sequence[str]) -> None:
    from edgediff.backends import BACKENDS

    for b in names:
        if b not in BACKENDS:
            raise InputError(f"unknown backend {b!r}; expected one of {sorted(BACKENDS)}")


def _reference(bundle, reference: Path | None) -> Path:
    """The diffusers folder ``--compare`` runs: ``--reference``, else the source the bundle was exported from. A
    derived bundle (optimize, quantize) records its parent bundle as its source: the chain is followed back to the
    exported bundle's source, the pipeline all of them compute."""
    from edgediff.bundle.reader import Bundle

    if reference is not None:
        return Path(reference)
    current = bundle
    for _ in range(MAX_DERIVATIONS):
        source = current.manifest.provenance.source
        if not source:
            raise InputError(f"{current.root} does not record its source pipeline; pass --reference DIR")
        if not current.manifest.provenance.parent or not (Path(source) / MANIFEST_NAME).is_file():
            return Path(source)
        try:
            current = Bundle.open(source)
        except Exception as exc:  # a parent bundle moved, edited or removed since
            raise InputError(f"{bundle.root} was derived from {source}, which cannot be opened ({exc}); pass "
                             "--reference DIR, the diffusers folder the bundle was exported from") from None
    raise InputError(f"{bundle.root}: more than {MAX_DERIVATIONS} derived bundles in a row; pass --reference DIR")


MAX_DERIVATIONS = 16  # optimize -> quantize -> ... ; a cycle of copied folders must not loop forever
