#!/usr/bin/env bash
# Issue 17: the SD3.5-medium-shaped transformer (any depth; sd35m.sh builds the full 24-block DIR/src and DIR/bundle)
# as INT8 arithmetic with fused attention: quantize --int8 (TensorRT layout, calibrated at 512x512 on 2 prompts x 4
# steps), then optimize --target cpu (engines.attention_fusion's SD3 pattern behind Q/DQ, activations as u8 so every
# INT8 MatMul runs integer; parity checked at 512x512), then that bundle against diffusers fp32 in one --compare run
# (512x512, 4 steps, the bundle's guidance: transformer batch 2), and one 4-step image from the fp32 and the INT8
# bundle with the same seed. Wall time and peak RSS of quantize and optimize come from /usr/bin/time -v.
#   bash bench/scripts/issue17/sd35m_int8_opt.sh DIR
set -uo pipefail
D=${1:?usage: sd35m_int8_opt.sh DIR}; HERE=$(cd "$(dirname "$0")/.." && pwd)
[[ -e $D/bundle/edgediff.json ]] || { echo "error: $D/bundle is missing: run sd35m.sh $D first" >&2; exit 2; }
[[ -e $D/bundle-i8/edgediff.json ]] || python "$HERE/tree_rss.py" "$D/quantize.tree.json" -- \
  /usr/bin/time -v -o "$D/quantize.time" edgediff quantize "$D/bundle" "$D/bundle-i8" --int8 --size 512x512 \
  --calib-size 2 --steps 4 || exit 1
[[ -e $D/bundle-i8-cpu/edgediff.json ]] || python "$HERE/tree_rss.py" "$D/optimize.tree.json" -- \
  /usr/bin/time -v -o "$D/optimize.time" edgediff optimize "$D/bundle-i8" "$D/bundle-i8-cpu" --target cpu \
  --size 512x512 || exit 1
grep -hE "Elapsed|Maximum resident" "$D/quantize.time" "$D/optimize.time"
edgediff bench run "$D/bundle-i8-cpu" --size 512x512 --steps 4 --warmup 1 --runs 2 --compare diffusers \
  --reference "$D/src" --compare-order alternate --json "$D/compare-bundle-i8-cpu.json" --overwrite
for b in bundle bundle-i8-cpu; do
  edgediff generate "a photograph of an astronaut riding a horse" -m "$D/$b" --size 512x512 --steps 4 --seed 0 \
    -o "$D/$b.png" --overwrite || exit 1
done
python "$HERE/image_diff.py" "$D/bundle.png" "$D/bundle-i8-cpu.png" "INT8 image vs fp32 (same seed)"
