#!/usr/bin/env bash
# Issue 17: what `edgediff optimize --target cpu` (ONNX Runtime's mmdit recipe: MultiHeadAttention, FastGelu, RMSNorm)
# does to the SD3.5-medium-shaped transformer, at full width and reduced depth (time per block does not depend on
# weight values or on the block count; the dual-attention blocks are the first 13 of 24, so at depth <= 13 every
# block has both attentions: attention's share is higher than in the full model).
#   bash bench/scripts/issue17/sd35m_fused.sh DIR [DEPTH]      (DEPTH default 2: ~10 GB on disk, ~1 h at 2 cores)
# Runs: the exported bundle and the optimized one each against diffusers in one --compare run (512x512, 4 steps,
# the bundle's guidance: transformer batch 2), then both bundles side by side in one sweep.
set -uo pipefail
D=${1:?usage: sd35m_fused.sh DIR [DEPTH]}; DEPTH=${2:-2}; mkdir -p "$D"
[[ -e $D/src/model_index.json ]] || python -m edgediff.export.random_pipeline sd35m "$D/src" --depth "$DEPTH"
[[ -e $D/bundle/edgediff.json ]] || edgediff export "$D/src" "$D/bundle"
[[ -e $D/bundle-cpu/edgediff.json ]] || edgediff optimize "$D/bundle" "$D/bundle-cpu" --target cpu
for b in bundle-cpu bundle; do
  edgediff bench run "$D/$b" --size 512x512 --steps 4 --warmup 1 --runs 3 --compare diffusers --reference "$D/src" \
    --compare-order alternate --json "$D/compare-$b.json" --overwrite
done
edgediff bench sweep "$D/bundle" "$D/bundle-cpu" --size 512x512 --steps 4 --warmup 1 --runs 3 \
  --json "$D/sweep.json" --overwrite
