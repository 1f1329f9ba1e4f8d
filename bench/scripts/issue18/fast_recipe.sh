#!/usr/bin/env bash
# "Fast on CPU" (README): LCM settings (what --preset lcm sets: scheduler lcm, 4 steps, guidance 1.0 — an LCM-LoRA
# fused or swapped does not change the graphs, so its time is this) with and without the tiny decoder, against a
# plain 25-step DPM++ 2M image, SD-1.5 shapes, 512x512. DIR must hold sd15-onnx and sd15-taesd (the same model
# exported with --tiny-vae: bench/scripts/issue18/taesd_and_cfg_cutoff.sh). Run from the repository root with nothing
# else running; the three figures come from one run of this script.
set -euo pipefail
DIR=${DIR:-/tmp/meas}
edgediff bench run "$DIR/sd15-onnx" --steps 25 --scheduler dpmpp_2m --guidance 7.5 --size 512x512 --runs 1 --warmup 0 \
  --json "$DIR/dpmpp-25.json" --overwrite
edgediff bench sweep "$DIR/sd15-taesd" --steps 4 --scheduler lcm --guidance 1.0 --size 512x512 --decoder tiny --runs 2 \
  --json "$DIR/fast.json" --overwrite
