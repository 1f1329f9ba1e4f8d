"""One UNet call of an SDXL-shaped bundle (batch 1, fixed random inputs): seconds per call, peak RSS, and the
output saved, to compare an --int8-storage UNet's arithmetic with its fp32 parent's.

ONNX Runtime (level "extended" and up, i.e. a graph that was not saved by edgediff optimize) rewrites INT8
DequantizeLinear -> MatMul into MatMulNBits, whose accuracy_level 4 (ORT's default for this rewrite) also rounds
the activations to INT8 per block of 32; session.qdq_matmulnbits_accuracy_level=1 keeps fp32 arithmetic.

    python bench/scripts/issue16/int8_storage_compute.py UNET.onnx OUT.npy [--size 512] [--accuracy-level 1]
    python bench/scripts/issue16/int8_storage_compute.py --compare FP32.npy A.npy B.npy ...
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def run(path: str, out: str, size: int, level: str | None) -> None:
    import onnxruntime as ort

    from edgediff.backends.ort import OrtOptions
    from edgediff.bench.memory import PeakRss

    extra = {"session.qdq_matmulnbits_accuracy_level": level} if level else {}
    s = ort.InferenceSession(path, OrtOptions(extra_session_config=extra).session_options(),
                             providers=["CPUExecutionProvider"])
    r, hw = np.random.default_rng(0), size // 8
    feeds = {"sample": r.standard_normal((1, 4, hw, hw), dtype=np.float32),
             "timestep": np.full((1,), 500, np.float32),
             "encoder_hidden_states": r.standard_normal((1, 77, 2048), dtype=np.float32),
             "text_embeds": r.standard_normal((1, 1280), dtype=np.float32),
             "time_ids": np.array([[size, size, 0, 0, size, size]], np.float32)}
    s.run(None, feeds)  # the first call's allocations are not the steady state
    times = []
    with PeakRss() as p:
        for _ in range(2):
            t = time.perf_counter()
            y = s.run(None, feeds)[0]
            times.append(time.perf_counter() - t)
    np.save(out, y)
    print(f"{path} accuracy_level={level or 'default'}: {', '.join(f'{t:.2f}' for t in times)} s per call, "
          f"peak {p.peak / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--accuracy-level", default=None)
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args()
    if a.compare:
        ref = np.load(a.paths[0])
        for p in a.paths[1:]:
            y = np.load(p)
            print(f"{p}: rel_l2 vs {a.paths[0]} = {np.linalg.norm(y - ref) / np.linalg.norm(ref):.4g}")
        return
    run(a.paths[0], a.paths[1], a.size, a.accuracy_level)


if __name__ == "__main__":
    main()
