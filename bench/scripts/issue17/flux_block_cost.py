"""FLUX transformer step cost, edgediff's exported graph (ONNX Runtime CPU) vs diffusers' FluxTransformer2DModel
(torch CPU), at full width and reduced depth (issue 17: per-block cost; time does not depend on weight values).

    python bench/scripts/issue17/flux_block_cost.py SRC BUNDLE [--latent 32] [--text 256] [--repeats 3]

SRC: a FluxPipeline folder (python -m edgediff.export.random_pipeline flux-schnell SRC --depth N); BUNDLE: its
export (edgediff export SRC BUNDLE). Both get the same inputs: (1, 16, latent, latent) latents (diffusers: packed,
with FluxPipeline's ids), ``text`` T5 tokens, one call each per repeat, interleaved, after one warm-up call each.
Prints the median seconds per call and the ratio. Divide by the bundle's blocks (N double + 2N single) for a
per-block figure; the embedders and the final layer are a small fixed part at full width.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("bundle")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256x256 pixels, 256 image tokens)")
    ap.add_argument("--text", type=int, default=256, help="T5 tokens")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    n, L = a.latent, a.text
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, n, n)).astype(np.float32)  # (1, C, h, w)
    t = np.array([1000.0], np.float32)
    text = rng.standard_normal((1, L, 4096)).astype(np.float32)
    pooled = rng.standard_normal((1, 768)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(f"{a.bundle}/transformer/model.onnx", so, providers=["CPUExecutionProvider"])
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": text, "pooled_projections": pooled}
    if "guidance" in {i.name for i in sess.get_inputs()}:
        feeds["guidance"] = np.array([3.5], np.float32)
    model = FluxTransformer2DModel.from_pretrained(a.src, subfolder="transformer").eval()
    packed = FluxPipeline._pack_latents(torch.from_numpy(x), 1, 16, n, n)
    ids = FluxPipeline._prepare_latent_image_ids(1, n // 2, n // 2, "cpu", torch.float32)
    guidance = torch.from_numpy(feeds["guidance"]) if "guidance" in feeds else None

    def theirs():
        with torch.no_grad():
            model(hidden_states=packed, timestep=torch.from_numpy(t) / 1000, guidance=guidance,
                  pooled_projections=torch.from_numpy(pooled), encoder_hidden_states=torch.from_numpy(text),
                  txt_ids=torch.zeros(L, 3), img_ids=ids, return_dict=False)

    def ours():
        sess.run(None, feeds)

    ours()
    theirs()
    times: dict[str, list[float]] = {"edgediff": [], "diffusers": []}
    for _ in range(a.repeats):
        for name, fn in (("edgediff", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    cfg = model.config
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"FLUX transformer, {cfg.num_layers} double + {cfg.num_single_layers} single blocks, width "
          f"{cfg.num_attention_heads * cfg.attention_head_dim}; {(n // 2) ** 2} image + {L} text tokens, batch 1; "
          f"torch threads {torch.get_num_threads()}")
    for k, v in times.items():
        print(f"  {k:<9} median {med[k]:.3f} s  ({', '.join(f'{s:.3f}' for s in v)})")
    print(f"  ratio edgediff / diffusers {med['edgediff'] / med['diffusers']:.2f}")


if __name__ == "__main__":
    main()
