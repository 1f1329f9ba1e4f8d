"""Terminal table, JSON, CSV and plot of benchmark rows."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from edgediff.errors import InputError, MissingDependency, OutputExistsError
from edgediff.outputs import write_atomic

SCHEMA_VERSION = 1


def check_writable(outputs: Mapping[str, Path | None], *, overwrite: bool = False) -> None:
    """Refuse, before anything is measured, a report that could not be written afterwards (option -> path; None:
    not asked for), and one that would replace an existing file without ``overwrite``."""
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        try:
            if path.is_dir():
                raise InputError(f"{option} {path} is a folder; give a file name")
            if path.exists() and not overwrite:
                raise OutputExistsError(f"{option} {path} exists; choose another name or pass --overwrite")
            if not path.parent.is_dir():
                raise InputError(f"{option} {path}: folder {path.parent} does not exist")
            # The temp file write_atomic will make beside the target, made and removed: the one test that a read-only
            # mount, /proc or a name too long refuse as the real write would (os.access says yes to root everywhere)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise InputError(f"{option} {str(path)[:80]} cannot be written: {exc.strerror or exc}; choose another "
                             "path") from None
    if outputs.get("--plot") is not None:
        _pyplot()  # matplotlib is an extra: say so now, not after the bench


def document(rows: Sequence[dict], environment: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "environment": environment, "results": list(rows)}


def variant_info(bundle) -> dict:
    m = bundle.manifest
    return {"path": str(bundle.root), "digest": bundle.digest, "family": m.family,
            "text_encoders": sorted(n for n in m.components if n.startswith("text_encoder")),
            "precision": {n: c.precision for n, c in m.components.items()},
            "unet_bytes": m.components[bundle.denoiser].size, "bytes": sum(f.size for f in m.all_files()),
            "transforms": list(m.provenance.transforms)}


def _variant_label(row: dict) -> str:
    v = row.get("variant") or {}
    steps = "; ".join(v.get("transforms") or []) or "as exported"
    return f"{Path(v.get('path', row['config']['bundle'])).name} [{v.get('precision', {}).get('unet', '?')}, {steps}]"


def variants_table(rows: Sequence[dict]) -> str:
    """Ratios of each bundle to the first bundle, per configuration (same backend/steps/size/batch/scheduler)."""
    paths = list(dict.fromkeys(r["config"]["bundle"] for r in rows))
    if len(paths) < 2:
        return ""
    key = lambda r: (tuple(r["config"][k] for k in ("backend", "steps", "height", "width", "batch", "scheduler"))  # noqa: E731
                     + ((r.get("lever") or {}).get("name"),))  # a speed lever is compared with the same lever
    base = {key(r): r for r in rows if r["config"]["bundle"] == paths[0]}
    out = [f"variants vs {_variant_label(rows[0])} (same run; ratio < 1 is faster/smaller):",
           f"  {'bundle':<58}{'size':>8}{'unet p50':>11}{'ratio':>8}{'per image':>11}{'ratio':>8}{'load':>8}{'ratio':>8}{'unet MB':>9}"]
    for r in rows:
        b = base.get(key(r))
        if b is None:
            continue
        c = r["config"]
        size = f"{c['width']}x{c['height']}" if c["width"] else "native"
        u, ub = r["stages"]["unet"]["p50"], b["stages"]["unet"]["p50"]
        lat, latb = r["latency_per_image"], b["latency_per_image"]
        load, loadb = r["load_seconds"], b["load_seconds"]
        cs = r.get("cold_start") or {}
        if cs:
            load, loadb = cs["load"], (b.get("cold_start") or {}).get("load", float("nan"))
        mb = (r.get("variant") or {}).get("unet_bytes", 0) / 1e6
        out.append(f"  {_variant_label(r)[:57]:<58}{size:>8}{u * 1e3:>9.0f}ms{u / ub:>8.3f}{lat:>10.2f}s{lat / latb:>8.3f}"
                   f"{load:>7.1f}s{load / loadb:>8.3f}{mb:>9.1f}")
    return "\n".join(out) + "\n"


def table(rows: Sequence[dict]) -> str:
    out = []
    for row in rows:
        c = row["config"]
        if row.get("variant"):
            out.append(f"bundle {_variant_label(row)}")
        if row.get("lever"):
            out.append(f"lever {row['lever']['name']}" + (f" (options {row['lever']['options']})"
                                                          if row["lever"]["options"] else " (no speed option)"))
        size = f"{c['width'] or 'native'}x{c['height'] or 'native'}" if c["width"] or c["height"] else "native"
        out.append(f"{c['backend']}  steps {c['steps']}  size {size}  batch {c['batch']}  guidance {c['guidance']}  "
                   f"scheduler {c['scheduler'] or 'bundle default'}  runs {c['runs']} (+{c['warmup']} warm-up)")
        out.append(f"  {'stage':<13}{'min':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'mean ± std':>20}   (ms)")
        for stage, s in row["stages"].items():
            per = " per step" if stage in ("unet", "scheduler") else ""
            out.append(f"  {stage:<13}{s['min']*1e3:>10.2f}{s['p50']*1e3:>10.2f}{s['p90']*1e3:>10.2f}"
                       f"{s['p99']*1e3:>10.2f}{s['mean']*1e3:>12.2f} ± {s['std']*1e3:<7.2f}{per}")
        encoders = (row.get("variant") or {}).get("text_encoders") or ["text_encoder"]
        if "text_encoder" in row["stages"] and "tokenize" not in row["stages"]:
            out.append(f"  (text_encoder: one span over the tokenizers and {' + '.join(encoders)})")
        o = row["overhead"]
        out.append(f"  loop overhead outside backend calls: {o['per_step_us']['mean']:.0f} µs per step "
                   f"({o['percent_of_step']:.3f} % of a step)")
        load = row["load_seconds"]  # NaN: the pipeline was loaded once for several rows (a sweep), timed in the first
        load_text = f"load {load:.2f} s" if math.isfinite(load) else "loaded with the row above"
        out.append(f"  {row['images_per_second']:.3f} images/s, {row['latency_per_image']:.3f} s per image; "
                   f"{load_text}, first image {row['first_image_seconds']:.2f} s; peak RSS "
                   f"{(row['peak_rss_bytes'] or 0) / 2**30:.2f} GiB")
        if row.get("cold_start"):
            cs = row["cold_start"]
            out.append(f"  cold start: imports {cs['process_to_imports']:.2f} s, load {cs['load']:.2f} s, "
                       f"first image {cs['first_image']:.2f} s")
        if row.get("compare"):
            cmp = row["compare"]
            ref, run = cmp["reference"], cmp.get("computation") or {}
            order = "alternating" if cmp.get("order", "alternate") == "alternate" else "ours, then theirs"
            out.append(f"  vs diffusers {ref.get('diffusers')} / torch {ref.get('torch')} {ref.get('pipeline', '')} "
                       f"(ours/theirs, same run, {order}):")
            if run:
                out.append(f"    both ran {run['scheduler']} ({run.get('diffusers_scheduler')}, spacing "
                           f"{run.get('timestep_spacing')}), timesteps {_timesteps(run['timesteps'])}, UNet batch "
                           f"{run['unet_batch'][0]}")
            for k, r in cmp["ratio"].items():
                if r is not None:
                    out.append(f"    {k:<14} {cmp['ours'][k]*1e3:10.1f} ms vs {cmp['theirs'][k]*1e3:10.1f} ms  = {r:.3f}x")
            mem = cmp.get("peak_rss_bytes") or {}
            if mem.get("ratio") is not None:
                out.append(f"    {'peak RSS':<14} {mem['ours'] / 2**30:10.2f} GiB vs {mem['theirs'] / 2**30:9.2f} GiB  "
                           f"= {mem['ratio']:.3f}x (each process, during its generations)")
        if row.get("ops"):
            out.append("  denoiser operators (ONNX Runtime profiler, one generation):")
            for op in row["ops"]:
                out.append(f"    {op['op']:<24} {op['seconds']*1e3:10.1f} ms  {op['percent']:5.1f} %")
        out.append("")
    return "\n".join(out)


def _timesteps(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}, ... {len(values)} in all]" if len(values) > 4 else f"[{shown}]"


def cold_start_table(config: dict, runs: Sequence[dict]) -> str:
    """``edgediff bench cold-start``: each phase of a fresh process over ``runs`` (``runner.cold_start`` dicts)."""
    from .stats import summarize

    c = config
    size = f"{c['width']}x{c['height']}" if c["width"] else "native"
    out = [f"cold start of {Path(c['bundle']).name}: {c['backend']}  steps {c['steps']}  size {size}  batch {c['batch']}"
           f"  guidance {c['guidance']}  scheduler {c['scheduler'] or 'bundle default'}  ({len(runs)} fresh processes)",
           f"  {'phase':<24}{'min':>10}{'p50':>10}{'max':>10}{'mean ± std':>20}   (s)"]
    phases = {"interpreter + imports": "process_to_imports", "load (sessions)": "load", "first image": "first_image",
              "total": "total"}
    for label, key in phases.items():
        s = summarize([r[key] for r in runs])
        out.append(f"  {label:<24}{s.min:>10.3f}{s.p50:>10.3f}{s.max:>10.3f}{s.mean:>12.3f} ± {s.std:<7.3f}")
    return "\n".join(out)


def flat(row: dict) -> dict:
    out = {f"config.{k}": v for k, v in row["config"].items()}
    for stage, s in row["stages"].items():
        for k, v in s.items():
            out[f"{stage}.{k}"] = v
    out["overhead.per_step_us.mean"] = row["overhead"]["per_step_us"]["mean"]
    out["overhead.percent_of_step"] = row["overhead"]["percent_of_step"]
    for k in ("images_per_second", "latency_per_image", "load_seconds", "first_image_seconds", "peak_rss_bytes"):
        out[k] = row[k]
    for k, v in (row.get("cold_start") or {}).items():
        out[f"cold_start.{k}"] = v
    for k, v in ((row.get("compare") or {}).get("ratio") or {}).items():
        out[f"ratio.{k}"] = v
    mem = (row.get("compare") or {}).get("peak_rss_bytes") or {}
    if mem:
        out["ratio.peak_rss"] = mem.get("ratio")
    lever = row.get("lever") or {}
    if lever:
        out["lever.name"] = lever["name"]
        for k, v in (lever.get("ratio") or {}).items():
            out[f"lever.ratio.{k}"] = v
        for metric, s in ((lever.get("quality") or {}).items()):
            if isinstance(s, dict):
                for k, v in s.items():
                    out[f"lever.{metric}.{k}"] = v
    return out


def write_json(path: Path, doc: dict, *, overwrite: bool = False) -> None:
    write_atomic(Path(path), (json.dumps(doc, indent=2) + "\n").encode(), overwrite=overwrite)


def write_csv(path: Path, rows: Sequence[dict], *, overwrite: bool = False) -> None:
    flats = [flat(r) for r in rows]
    fields = sorted({k for f in flats for k in f})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(flats)
    write_atomic(Path(path), buf.getvalue().encode(), overwrite=overwrite)


def write_plot(path: Path, rows: Sequence[dict], *, overwrite: bool = False) -> None:
    """Stacked per-stage latency bars, one per configuration."""
    plt = _pyplot()
    labels, parts = [], {s: [] for s in ("text_encoder", "unet", "scheduler", "vae_decode", "other")}
    for row in rows:
        c, st = row["config"], row["stages"]
        size = f"{c['width']}x{c['height']}" if c["width"] else "native size"
        labels.append(f"{c['backend']}\n{c['steps']} steps, batch {c['batch']}\n{size}")
        steps_total = {k: st[k]["mean"] * (st[k]["n"] / c["runs"]) if k in st else 0.0 for k in ("unet", "scheduler")}
        known = st.get("text_encoder", {}).get("mean", 0) + steps_total["unet"] + steps_total["scheduler"] + st.get("vae_decode", {}).get("mean", 0)
        parts["text_encoder"].append(st.get("text_encoder", {}).get("mean", 0))
        parts["unet"].append(steps_total["unet"])
        parts["scheduler"].append(steps_total["scheduler"])
        parts["vae_decode"].append(st.get("vae_decode", {}).get("mean", 0))
        parts["other"].append(max(0.0, st["total"]["mean"] - known))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for name, vals in parts.items():
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per generation (mean)")
    ax.set_title("edgediff bench: latency by stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(Path(path), buf.getvalue(), overwrite=overwrite)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("--plot needs matplotlib: pip install 'edgediff[bench]'") from None
    return plt
