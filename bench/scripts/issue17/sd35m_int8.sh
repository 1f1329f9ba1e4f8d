#!/usr/bin/env bash
# Issue 17: INT8 arithmetic for the SD3.5-medium-shaped transformer (quantize --int8: every linear layer outside the
# conditioning path INT8, run by ONNX Runtime's integer kernels -- VNNI/AMX where the CPU has them), at full width and
# the reduced depth of sd35m_fused.sh (run that first: it builds DIR/src and DIR/bundle).
#   bash bench/scripts/issue17/sd35m_int8.sh DIR
# Runs: quantize (calibrated at 512x512, 2 prompts x 4 steps), the INT8 bundle against diffusers fp32 in one
# --compare run (512x512, 4 steps, the bundle's guidance: transformer batch 2), and one 4-step image from each bundle
# with the same seed, for the INT8 image's difference from the fp32 one.
set -uo pipefail
D=${1:?usage: sd35m_int8.sh DIR}
[[ -e $D/bundle/edgediff.json ]] || { echo "error: $D/bundle is missing: run sd35m_fused.sh $D first" >&2; exit 2; }
[[ -e $D/bundle-i8/edgediff.json ]] || edgediff quantize "$D/bundle" "$D/bundle-i8" --int8 --size 512x512 \
  --calib-size 2 --steps 4 || exit 1
edgediff bench run "$D/bundle-i8" --size 512x512 --steps 4 --warmup 1 --runs 3 --compare diffusers \
  --reference "$D/src" --compare-order alternate --json "$D/compare-bundle-i8.json" --overwrite
for b in bundle bundle-i8; do
  edgediff generate "a photograph of an astronaut riding a horse" -m "$D/$b" --size 512x512 --steps 4 --seed 0 \
    -o "$D/$b.png" --overwrite || exit 1
done
python "$(dirname "$0")/../image_diff.py" "$D/bundle.png" "$D/bundle-i8.png" "INT8 image vs fp32 (same seed)"
