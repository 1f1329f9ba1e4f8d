#!/usr/bin/env bash
# Our tiled decode vs diffusers' AutoencoderKL.enable_tiling() on the same latent (1024x1024 on SD 1.5), in the VAE's
# own tiles and in TILE-pixel tiles (vae_tile_size; diffusers: tile_sample_min_size and tile_latent_min_size set).
B=${B:-/tmp/sd15-bundle}; SRC=${SRC:-/tmp/sd15-random}; TILE=${TILE:-256}
python - "$B" "$SRC" "$TILE" <<'EOF_PY'
import sys
import numpy as np
import torch, diffusers
from edgediff import Pipeline, images
from edgediff.vae_tiling import run_vae
pipe = Pipeline.load(sys.argv[1], low_memory=True)
z = np.random.default_rng(0).standard_normal((1, 4, 128, 128)).astype(np.float32)
vae = diffusers.AutoencoderKL.from_pretrained(sys.argv[2], subfolder="vae").eval()
vae.enable_tiling()
f = pipe.bundle.manifest.vae_scale_factor
for tile in (None, int(sys.argv[3])):
    if tile is not None:
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // f
    mine = run_vae(pipe.components, pipe.bundle, "vae_decoder", z, True, tile)
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)).sample.numpy()
    err = np.abs(images.to_float(mine) - images.to_float(theirs)).max()
    print(f"tile {tile or vae.config.sample_size} px: tiled decode vs diffusers max abs {err:.2e} on [0, 1] images "
          f"(bar {2 / 255:.2e})")
EOF_PY
