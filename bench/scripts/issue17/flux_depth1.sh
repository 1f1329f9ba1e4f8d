#!/usr/bin/env bash
# FLUX.1-schnell at full width and depth 1 (issue 17): build it with random weights, export it (peak RSS and time
# from /usr/bin/time -v; the transformer's 2.6 GB go to external data), then the transformer's step cost ours vs
# diffusers (flux_block_cost.py). About 5 GB of disk each for SRC and OUT. Run from the repository root.
set -euo pipefail
SRC=${SRC:-/work/meas/flux-schnell-d1}
OUT=${OUT:-/work/meas/flux-schnell-d1-onnx}
[ -d "$SRC" ] || python -m edgediff.export.random_pipeline flux-schnell "$SRC" --depth 1
[ -d "$OUT" ] || /usr/bin/time -v edgediff export "$SRC" "$OUT" 2> "$OUT.export.log" \
  || { tail -20 "$OUT.export.log"; exit 1; }
grep -E "Maximum resident|Elapsed" "$OUT.export.log" || true
edgediff inspect "$OUT" | grep -E "^[a-z_0-9]+ +\[|parity" || true
python bench/scripts/issue17/flux_block_cost.py "$SRC" "$OUT" --latent 32 --text 256 --repeats 3
