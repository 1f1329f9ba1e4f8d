#!/usr/bin/env bash
# TAESD decode vs the VAE's at 512x512 and whole 4-step images, on an SD-1.5-shaped bundle with a TAESD-shaped tiny
# autoencoder (random weights: speed does not depend on their values).
SRC=${SRC:-/tmp/sd15-random}; OUT=${OUT:-/tmp/sd15-taesd}; TAESD=${TAESD:-/tmp/taesd-random}
[ -d "$TAESD" ] || python -c "from diffusers import AutoencoderTiny; AutoencoderTiny().save_pretrained('$TAESD')"
[ -d "$OUT" ] || edgediff export "$SRC" "$OUT" --tiny-vae "$TAESD"
python - "$OUT" <<'EOF'
import sys, time
import numpy as np
from edgediff import Pipeline, tiny_vae
from edgediff.vae_tiling import run_vae
pipe = Pipeline.load(sys.argv[1])
f = pipe.bundle.manifest.vae_scale_factor
h, w = pipe.bundle.manifest.default_height, pipe.bundle.manifest.default_width
z = np.random.default_rng(0).standard_normal((1, 4, h // f, w // f)).astype(np.float32)
def best(fn, n=3):
    fn()  # warm-up (session start, arena growth)
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)
full = best(lambda: run_vae(pipe.components, pipe.bundle, "vae_decoder", z, False))
tiny = best(lambda: tiny_vae.decode(pipe.components, pipe.bundle, z))
print(f"{w}x{h} decode: VAE {full:.3f} s, tiny {tiny:.4f} s: {full / tiny:.1f}x")
image = lambda d: pipe("a watercolor fox", num_inference_steps=4, seed=0, decoder=d).timings["total"]
plain, fast = best(lambda: image("full"), 2), best(lambda: image("tiny"), 2)
print(f"4-step image: {plain:.2f} s with the VAE, {fast:.2f} s with the tiny decoder: {plain / fast:.2f}x")
for cut in (None, 0.5):
    r = pipe("a watercolor fox", num_inference_steps=20, seed=0, cfg_cutoff=cut)
    print(f"20 steps, cfg_cutoff={cut}: UNet {r.timings['unet']:.2f} s, total {r.timings['total']:.2f} s")
EOF
