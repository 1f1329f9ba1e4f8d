#!/usr/bin/env bash
# DeepCache interval 3 at skip branch 1 (issue 18 item 3): UNet time per image vs the plain run, 20 steps, 512x512,
# on the SD-1.5-shaped random model. Branch 1 is the setting whose adherence cost on the built-in model is within
# issue 18's bound (export/recipes/shapes/README.md, "DeepCache on the built-in model"); deepcache.sh measures
# branches 0 and 3. SRC as in deepcache.sh; OUT: a new bundle with branch 1's graphs only (the full UNet is a second
# UNet copy: about +3.4 GB). Run from the repository root, nothing else running.
set -euo pipefail
SRC=${SRC:-/work/meas/sd15-random}
OUT=${OUT:-/work/meas/sd15-dc1}
[ -d "$OUT" ] || /usr/bin/time -v edgediff export "$SRC" "$OUT" --deepcache 1 > "$OUT.export.log" 2>&1 \
  || { tail -20 "$OUT.export.log"; exit 1; }
grep -E "Maximum resident|Elapsed" "$OUT.export.log" || true
du -sh "$OUT"/unet "$OUT"/unet_deepcache_*
# the plain run and the lever interleaved with the same seeds; "unet" per image sums the full and shallow calls
edgediff bench sweep "$OUT" --steps 20 --size 512x512 --guidance 7.5 --cache-interval 3 --cache-branch 1 \
  --runs 3 --json "$OUT.sweep-b1.json" --overwrite
