#!/usr/bin/env bash
# The built-in model's tiny decoder (issue 18 item 6): distil it (recipe stage 3), then measure it with the bench
# against the plain run (time per image, ratios, PSNR/SSIM vs the VAE decoder's image of the same seed) next to CFG
# cutoff 0.5, and prompt adherence with eval-default (plain, --decoder tiny, --cfg-cutoff 0.5; same seeds).
# Environment: the repository's venv with edgediff[export]. Outputs under OUT (default /tmp/builtin-tiny).
# STEPS (distillation steps, default the recipe's), N (eval-default prompts per split, default 200), SPLIT (both),
# REFERENCE (1: eval-default also reports PSNR against the plain images, which generates every image twice; 0: not).
set -euo pipefail
OUT=${OUT:-/tmp/builtin-tiny}; N=${N:-200}; SPLIT=${SPLIT:-both}; RUNS=${RUNS:-5}; REFERENCE=${REFERENCE:-1}
mkdir -p "$OUT"
BUNDLE="$OUT/shapes-tiny"
if [ ! -f "$BUNDLE/edgediff.json" ]; then
  python -m edgediff.export.recipes.shapes.tiny_decoder --out "$OUT/taesd" --bundle-out "$BUNDLE" --overwrite \
    ${STEPS:+--steps "$STEPS"} 2>&1 | tee "$OUT/recipe.log"
fi
edgediff bench sweep "$BUNDLE" --decoder tiny --cfg-cutoff 0.5 --runs "$RUNS" --json "$OUT/levers.json" --overwrite \
  | tee "$OUT/levers.txt"
for opts in "" "--decoder tiny" "--cfg-cutoff 0.5"; do
  name=$(echo "plain $opts" | tr -s ' -' '_')
  # shellcheck disable=SC2086
  ref=(); if [ "$REFERENCE" = 1 ] && [ -n "$opts" ]; then ref=(--reference "$BUNDLE"); fi
  edgediff eval-default -m "$BUNDLE" --n "$N" --split "$SPLIT" $opts "${ref[@]}" | tee "$OUT/eval$name.txt"
done
