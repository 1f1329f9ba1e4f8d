"""SD3 transformer call cost: ONNX Runtime on one or more graphs (e.g. the exported and the optimized one) vs
diffusers' SD3Transformer2DModel, same inputs, calls interleaved; with --profile, ONNX Runtime's per-operator kernel
time for each graph (issue 17: where the transformer's time goes).

    python bench/scripts/issue17/sd3_block_cost.py SRC GRAPH[,GRAPH...] [--latent 64] [--batch 2] [--text 333]
        [--repeats 3] [--profile] [--no-torch]

SRC: a StableDiffusion3Pipeline folder (python -m edgediff.export.random_pipeline sd35m SRC --depth N); GRAPH: a
transformer/model.onnx of its export or of `edgediff optimize`. Defaults: 512x512 pixels (64x64 latents), CFG batch 2,
77 CLIP + 256 T5 tokens. Sessions use ONNX Runtime's defaults (level "all"), not the runtime's options: for what
users get, see `edgediff bench sweep` (bench/scripts/issue17/sd35m_fused.sh).
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("graphs")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text", type=int, default=333)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((a.batch, 16, a.latent, a.latent)).astype(np.float32),  # (B, C, h, w)
             "timestep": np.full((a.batch,), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((a.batch, a.text, 4096)).astype(np.float32),
             "pooled_projections": rng.standard_normal((a.batch, 2048)).astype(np.float32)}
    calls, sessions = [], []
    for g in a.graphs.split(","):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if a.profile:
            so.enable_profiling = True
            so.profile_file_prefix = "ort_profile_" + g.replace("/", "_")
        s = ort.InferenceSession(g, so, providers=["CPUExecutionProvider"])
        sessions.append((g, s))
        calls.append((g, lambda s=s: s.run(None, feeds)))
    if not a.no_torch:
        import torch
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(a.src, subfolder="transformer").eval()
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def theirs():
            with torch.no_grad():
                model(hidden_states=t["sample"], timestep=t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                      pooled_projections=t["pooled_projections"], return_dict=False)
        calls.append(("diffusers", theirs))
    for _, call in calls:  # warm-up
        call()
    times = collections.defaultdict(list)
    for _ in range(a.repeats):
        for name, call in calls:
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["diffusers"])) if "diffusers" in times else None
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:60s} median {med:7.3f} s" + (f"  {med / base:.3f}x diffusers" if base else "")
              + f"  runs {' '.join(f'{v:.2f}' for v in ts)}")
    for g, s in sessions if a.profile else ():
        events = json.load(open(s.end_profiling()))
        per_op, count = collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"]
                count[e["args"]["op_name"]] += 1
        n = a.repeats + 1
        total = sum(per_op.values())
        print(f"--- {g}: kernel time {total / 1e6 / n:.3f} s per call")
        for op, us in per_op.most_common(12):
            print(f"   {op:28s} {us / 1e6 / n:7.3f} s  {100 * us / total:5.1f} %  x{count[op] // n}")


if __name__ == "__main__":
    main()
