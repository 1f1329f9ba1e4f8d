"""Peak resident memory per stage of one generation (sampled every 5 ms from /proc), to see which stage of a
--low-memory run sets the peak: each component's open, run and close, and the gaps between them.

    python bench/scripts/issue16/lowmem_stages.py BUNDLE [--size 1024] [--guidance 5] [--steps 1]
        [--options '{"disable_prepacking": false}'] [--resident]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from contextlib import contextmanager

from edgediff import Pipeline
from edgediff.backends.ort import OrtOptions
from edgediff.bench.memory import rss_bytes
from edgediff.components import Components


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--options", default="{}", help="OrtOptions fields, as JSON")
    ap.add_argument("--resident", action="store_true", help="default mode instead of --low-memory")
    a = ap.parse_args()

    label, first, peak, stop = ["load"], {}, {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            v, k = rss_bytes(), label[0]
            first.setdefault(k, v)
            peak[k] = max(peak.get(k, 0), v)
            stop.wait(0.005)

    use = Components.use

    @contextmanager
    def labelled(self, name):
        label[0] = f"{name}: open"
        with use(self, name) as backend:
            label[0] = f"{name}: run"
            yield backend
            label[0] = f"{name}: close"
        label[0] = f"after {name}"

    Components.use = labelled
    threading.Thread(target=sample, daemon=True).start()
    pipe = Pipeline.load(a.bundle, low_memory=not a.resident, options=OrtOptions(**json.loads(a.options)))
    t0 = time.perf_counter()
    pipe("a photograph of an astronaut riding a horse", num_inference_steps=a.steps, guidance_scale=a.guidance,
         height=a.size, width=a.size, seed=0, scheduler="euler")
    seconds = time.perf_counter() - t0
    stop.set()
    time.sleep(0.05)
    for k, v in peak.items():
        print(f"{k:24s} entering {first[k] / 2**30:6.2f} GiB   peak {v / 2**30:6.2f} GiB")
    print(f"peak {max(peak.values()) / 2**30:.2f} GiB, generation {seconds:.1f} s")


if __name__ == "__main__":
    main()
