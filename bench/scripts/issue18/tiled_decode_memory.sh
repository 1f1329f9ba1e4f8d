#!/usr/bin/env bash
# Peak RSS of one VAE decode of a 1024x1024 image's latent (1, 4, 128, 128): untiled, tiled in the VAE's own tiles
# (diffusers' default, 512 px on SD 1.5), and tiled in each of TILES pixels (vae_tile_size), each in its own process
# (ru_maxrss is a process's high-water mark). B: an SD-1.5-shaped bundle, e.g.
#   python -m edgediff.export.random_pipeline sd15 /tmp/sd15-random && edgediff export /tmp/sd15-random /tmp/sd15-bundle
B=${B:-/tmp/sd15-bundle}; TILES=${TILES:-"256 384"}
for mode in untiled default $TILES; do
python - "$B" "$mode" <<'PY'
import resource, sys, time
import numpy as np
from edgediff import Pipeline
from edgediff.vae_tiling import run_vae
bundle, mode = sys.argv[1], sys.argv[2]
tiling, tile = (False, None) if mode == "untiled" else (True, None if mode == "default" else int(mode))
pipe = Pipeline.load(bundle, low_memory=True)  # nothing resident: the decoder is loaded for this one call
z = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)  # 1024x1024 on SD 1.5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
run_vae(pipe.components, pipe.bundle, "vae_decoder", z, tiling, tile)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{mode:>8}: peak RSS {peak / 2**20:.2f} GiB (before the decode {before / 2**20:.2f} GiB), "
      f"{time.perf_counter() - t0:.1f} s")
PY
done
