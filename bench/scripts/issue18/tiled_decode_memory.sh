#!/usr/bin/env bash
# Peak RSS of one VAE decode of a 1024x1024 image's latent (1, 4, 128, 128), untiled vs tiled, each in its own
# process. B: an SD-1.5-shaped bundle, e.g.
#   python -m edgediff.export.random_pipeline sd15 /tmp/sd15-random && edgediff export /tmp/sd15-random /tmp/sd15-bundle
B=${B:-/tmp/sd15-bundle}
for mode in False True; do
python - "$B" "$mode" <<'EOF'
import resource, sys, time
import numpy as np
from edgediff import Pipeline
from edgediff.vae_tiling import run_vae
bundle, tiled = sys.argv[1], sys.argv[2] == "True"
pipe = Pipeline.load(bundle, low_memory=True)  # nothing resident: the decoder is loaded for this one call
z = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)  # 1024x1024 on SD 1.5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
run_vae(pipe.components, pipe.bundle, "vae_decoder", z, tiled)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"vae_tiling={tiled}: peak RSS {peak / 2**20:.2f} GiB (before the decode {before / 2**20:.2f} GiB), "
      f"{time.perf_counter() - t0:.1f} s")
EOF
done
