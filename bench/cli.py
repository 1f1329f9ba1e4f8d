"""``edgediff bench [sweep] [BUNDLE] ...``: measure one configuration, or the cartesian product of comma lists."""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Sequence

import click

from edgediff.errors import InputError

from . import report
from .environment import record
from .runner import BenchConfig, cold_start, measure


def _list(name: str, value: str | None, cast) -> list:
    if value is None:
        return [None]
    items = [v.strip() for v in str(value).split(",")]
    if not items or any(not v for v in items):
        raise InputError(f"--{name} {value!r}: empty entry; give a comma-separated list such as 4,20")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise InputError(f"--{name} {value!r}: not a list of {cast.__name__} values") from None


def _size(v: str) -> tuple[int, int]:
    parts = v.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(v)
    return int(parts[1]), int(parts[0])


_size.__name__ = "WIDTHxHEIGHT"


def run_bench(args: Sequence[str], *, backend, steps, size, batch, guidance, scheduler, warmup, runs, seed, low_memory,
              compare, reference, profile_ops, cold, json_path, csv_path, plot_path, trace_path) -> str:
    from edgediff import Pipeline
    from edgediff.backends import BACKENDS

    args = list(args)
    sweep = bool(args) and args[0] == "sweep"
    if sweep:
        args = args[1:]
    if len(args) > 1 and not sweep:
        raise InputError(f"expected at most one BUNDLE, got {args}; compare bundles with `edgediff bench sweep B1 B2 ...`")
    if args:
        bundles = args
    else:
        from edgediff.builtin_model import default_bundle

        bundles = [str(default_bundle())]
    for p in (json_path, csv_path, plot_path, trace_path):
        if p is not None and not Path(p).parent.is_dir():
            raise InputError(f"cannot write {p}: folder {Path(p).parent} does not exist")
    lists = dict(backend=_list("backend", backend, str), steps=_list("steps", steps, int), size=_list("size", size, _size),
                 batch=_list("batch", batch, int), scheduler=_list("scheduler", scheduler, str))
    if not sweep:
        many = [k for k, v in lists.items() if len(v) > 1]
        if many:
            raise InputError(f"--{many[0]} has several values; use `edgediff bench sweep` for a cartesian product")
    for b in lists["backend"]:
        if b not in BACKENDS:
            raise InputError(f"unknown backend {b!r}; expected one of {sorted(BACKENDS)}")
    from edgediff.bundle.reader import Bundle

    variants = [Bundle.open(b) for b in bundles]  # every bundle is checked before the first measurement
    rows, last_spans, first = [], [], None
    # Bundles one after another (each closed before the next loads: an SD-1.5 bundle and its variants do not fit in
    # memory together); within a bundle, the cartesian product of the lists.
    for variant in variants:
        pipes: dict = {}
        try:
            for b, st, sz, bt, sc in itertools.product(*lists.values()):
                h, w = sz if sz else (None, None)
                cfg = BenchConfig(bundle=str(variant.root), backend=b, steps=st or 20, height=h, width=w,
                                  batch=bt or 1, guidance=guidance, scheduler=sc, warmup=warmup, runs=runs, seed=seed,
                                  low_memory=low_memory)
                load = None
                if b not in pipes:
                    t0 = time.perf_counter()
                    pipes[b] = Pipeline.load(variant.root, backend=b, low_memory=low_memory)
                    load = time.perf_counter() - t0
                row = measure(cfg, pipe=pipes[b], profile_ops=profile_ops)
                row.load_seconds = load if load is not None else float("nan")  # loaded once per backend
                row.variant = report.variant_info(variant)
                if cold:
                    row.cold_start = cold_start(cfg)
                if compare:
                    from .compare import compare as run_compare

                    src = Path(reference) if reference else Path(pipes[b].bundle.manifest.provenance.source or "")
                    if not str(src) or str(src) == ".":
                        raise InputError("the bundle does not record its source pipeline; pass --reference DIR")
                    row.compare = run_compare(cfg, pipes[b], src)
                rows.append(row.to_dict())
                last_spans = row.trace_spans
        finally:
            if first is None and pipes:
                first = next(iter(pipes.values()))
                first_providers = sorted(pipes)
            for p in pipes.values():
                p.close()
    env = record(providers=first_providers, bundle_digest=first.bundle.digest,
                 precision=first.bundle.component("unet").precision)
    doc = report.document(rows, env)
    if json_path:
        report.write_json(json_path, doc)
    if csv_path:
        report.write_csv(csv_path, rows)
    if plot_path:
        report.write_plot(plot_path, rows)
    if trace_path:
        from .trace import write_trace

        write_trace(trace_path, last_spans)
    return report.table(rows) + report.variants_table(rows) + f"\nenvironment: {env['cpu']} ({env['cores']} cores), onnxruntime " \
        f"{env['packages']['onnxruntime']}, bundle {env['bundle'][:16]}\nnot measured: {'; '.join(env['not_measured'])}"
