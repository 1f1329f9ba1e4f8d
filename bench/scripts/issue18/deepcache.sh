#!/usr/bin/env bash
# DeepCache (issue 18 item 3): UNet time per image with --cache-interval 3 vs the plain run, 20 steps, 512x512, on
# the SD-1.5-shaped random model (time does not depend on the weights' values), plus the quality cost (PSNR/SSIM of
# each image vs the plain image of the same seed) that `bench sweep` reports for every lever.
# SRC: the diffusers folder of the SD-1.5-shaped random model (python -m edgediff.export.random_pipeline sd15 SRC).
# OUT: a new bundle exported from it with DeepCache's graphs for branches 0 and 3 (the full UNet is a second UNet
# copy: about +3.4 GB on disk, and in memory while DeepCache runs). Run from the repository root, nothing else running.
# Expected from FLOPs (torch.utils.flop_counter on the SD-1.5 UNet at 512x512, batch 2; not a time): the shallow graph
# costs 7.9 % of the full UNet for branch 0, 47 % for branch 3, so interval 3 needs (1 + 2 s) / 3 = 0.39 / 0.65 of the
# UNet's FLOPs; the bar is 0.55x of the plain run's UNet time.
set -euo pipefail
SRC=${SRC:-/work/meas/sd15-random}
OUT=${OUT:-/work/meas/sd15-deepcache}
[ -d "$OUT" ] || /usr/bin/time -v edgediff export "$SRC" "$OUT" --deepcache 0,3 2> "$OUT.export.log" \
  || { tail -20 "$OUT.export.log"; exit 1; }
grep -E "Maximum resident|Elapsed" "$OUT.export.log" || true
du -sh "$OUT"/unet "$OUT"/unet_deepcache_*
edgediff inspect "$OUT" | grep -iE "deepcache|parity" || true
# the plain run and each lever interleaved with the same seeds; "unet" per image sums the full and shallow calls
edgediff bench sweep "$OUT" --steps 20 --size 512x512 --guidance 7.5 --cache-interval 2,3 --cache-branch 0 \
  --runs 3 --json "$OUT.sweep-b0.json" --overwrite
edgediff bench sweep "$OUT" --steps 20 --size 512x512 --guidance 7.5 --cache-interval 3 --cache-branch 3 \
  --runs 3 --json "$OUT.sweep-b3.json" --overwrite
