"""Peak host memory and denoiser step time of a bundle under different ONNX Runtime session settings, each in a
fresh process (peak RSS is a per-process high-water mark, so modes must not share one).

    python -m edgediff.bench.memory_modes BUNDLE [--size 512x512] [--steps 2] [--modes ort-defaults,default,low-memory]
"""
from __future__ import annotations

import argparse
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


def child(bundle: str, mode: str, height: int, width: int, steps: int) -> None:
    from edgediff import Pipeline
    from edgediff.backends.ort import OrtOptions
    from edgediff.bench.memory import rss_bytes

    overrides, low = MODES[mode]
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, options=OrtOptions(**overrides), low_memory=low)
    load = time.perf_counter() - t0
    after_load = rss_bytes()
    r = pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=7.5,
             height=height, width=width, seed=0, scheduler="euler")
    unet = [s.seconds for s in r.spans if s.name == "unet"]
    print(json.dumps({"mode": mode, "load_s": load, "rss_after_load": after_load,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "unet_step_s": sum(unet) / len(unet), "total_s": r.timings["total"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.lower().split("x"))
    if a.child:
        child(a.bundle, a.child, h, w, a.steps)
        return
    for mode in a.modes.split(","):
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}; expected one of {list(MODES)}")
        out = subprocess.run([sys.executable, "-m", "edgediff.bench.memory_modes", a.bundle, "--size", a.size,
                              "--steps", str(a.steps), "--child", mode], capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"mode": mode, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:<14} peak RSS {row['peak_rss'] / 2**30:6.2f} GiB  after load {row['rss_after_load'] / 2**30:6.2f} GiB  "
              f"unet step {row['unet_step_s']:6.2f} s  load {row['load_s']:6.1f} s  total {row['total_s']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
