#!/usr/bin/env bash
# LCM (issue 18): a 4-step LCM image vs a 25-step DPM++ 2M image at 512x512, SD-1.5 layer sizes, random weights
# (time does not depend on weight values). Three rows:
#   lcm-onnx   the LCM UNet (time_cond_proj_dim 256, LCM_Dreamshaper_v7's shape): 4 steps, its default guidance 8.5
#              as the w-embedding, one UNet batch per step;
#   sd15-onnx  with the LCM-LoRA recipe's settings (what --preset lcm sets: scheduler lcm, 4 steps, guidance 1.0);
#              a fused LCM-LoRA does not change the graph, so this is its time;
#   sd15-onnx  plain: DPM++ 2M, 25 steps, guidance 7.5 (classifier-free guidance: batch 2 per step).
# DIR must hold sd15-random and its export sd15-onnx (as bench/scripts/issue19/lora_swap.sh); the LCM model is
# built and exported here. Run from the repository root with nothing else running.
set -euo pipefail
export DIR=${DIR:-/tmp/meas}
[ -d "$DIR/lcm-random" ] || python -m edgediff.export.random_pipeline lcm "$DIR/lcm-random"
[ -d "$DIR/lcm-onnx" ] || edgediff export "$DIR/lcm-random" "$DIR/lcm-onnx"
edgediff bench run "$DIR/lcm-onnx" --steps 4 --size 512x512 --runs 3 --json "$DIR/lcm-4.json" --overwrite
edgediff bench run "$DIR/sd15-onnx" --steps 4 --scheduler lcm --guidance 1.0 --size 512x512 --runs 3 \
  --json "$DIR/lcm-lora-4.json" --overwrite
edgediff bench run "$DIR/sd15-onnx" --steps 25 --scheduler dpmpp_2m --guidance 7.5 --size 512x512 --runs 3 \
  --json "$DIR/dpmpp-25.json" --overwrite
