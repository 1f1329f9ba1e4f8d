"""Peak host memory and denoiser step time of a bundle under different ONNX Runtime session settings, each in a
fresh process (peak RSS is a per-process high-water mark, so modes must not share one).

    edgediff bench memory-modes BUNDLE [--size 512x512] [--steps 2] [--modes ort-defaults,default,low-memory]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

# mode -> (OrtOptions overrides, low_memory)
ORT = {"enable_mem_arena": True, "shared_arena": False, "enable_mem_pattern": True, "disable_prepacking": False}
MODES: dict[str, tuple[dict, bool]] = {
    "ort-defaults": (ORT, False),  # ONNX Runtime's own session defaults
    "arena-off": (ORT | {"enable_mem_arena": False}, False),
    "no-prepack": (ORT | {"disable_prepacking": True}, False),
    "lean": (ORT | {"enable_mem_arena": False, "disable_prepacking": True}, False),
    "shared-arena-pattern": (ORT | {"shared_arena": True}, False),  # why the default turns the memory pattern off
    "default": ({}, False),  # edgediff's own OrtOptions defaults: shared arena, no memory pattern
    "low-memory": ({}, True),
}


def child(bundle: str, mode: str, height: int | None, width: int | None, steps: int) -> None:
    """The measurement itself, run in the fresh process ``measure`` starts: prints one JSON line."""
    from edgediff import Pipeline
    from edgediff.backends.ort import OrtOptions
    from edgediff.bench.memory import rss_bytes
    from edgediff.bench.runner import prompt_for

    overrides, low = MODES[mode]
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, options=OrtOptions(**overrides), low_memory=low)
    load = time.perf_counter() - t0
    after_load = rss_bytes()
    r = pipe(prompt_for(bundle), num_inference_steps=steps, guidance_scale=7.5,  # CFG: the UNet's batch of 2
             height=height, width=width, seed=0, scheduler="euler")
    unet = [s.seconds for s in r.spans if s.name == "unet"]
    print(json.dumps({"mode": mode, "load_s": load, "rss_after_load": after_load,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "unet_step_s": sum(unet) / len(unet), "total_s": r.timings["total"]}))


def measure(bundle: str, mode: str, height: int | None, width: int | None, steps: int) -> dict:
    """``mode`` in a fresh process: its row, or ``{"mode", "error"}`` with the child's last line of stderr."""
    code = f"from edgediff.bench.memory_modes import child; child({bundle!r}, {mode!r}, {height!r}, {width!r}, {steps!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        return {"mode": mode, "error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def line(row: dict) -> str:
    if "error" in row:
        return f"{row['mode']:<14} failed: {row['error']}"
    return (f"{row['mode']:<14} peak RSS {row['peak_rss'] / 2**30:6.2f} GiB  after load {row['rss_after_load'] / 2**30:6.2f}"
            f" GiB  unet step {row['unet_step_s']:6.2f} s  load {row['load_s']:6.1f} s  total {row['total_s']:6.1f} s")
