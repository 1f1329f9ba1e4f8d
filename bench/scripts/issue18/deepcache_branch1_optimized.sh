#!/usr/bin/env bash
# DeepCache interval 3 at skip branch 1 on the CPU-optimized bundle (issue 18 item 3): `edgediff optimize --target
# cpu` fuses the attention of the DeepCache graphs as it fuses the unet's, and a shallow step at 512x512 is mostly
# 64x64 attention, so the plain run and the lever are compared as CPU users run them. IN: the bundle of
# deepcache_branch1.sh (SD-1.5 shapes, --deepcache 1); OUT: its optimized copy (~7 GB). Run from the repository
# root, nothing else running.
set -euo pipefail
IN=${IN:-/work/meas/sd15-dc1}
OUT=${OUT:-/work/meas/sd15-dc1-opt}
[ -d "$OUT" ] || /usr/bin/time -v edgediff optimize "$IN" "$OUT" --target cpu > "$OUT.log" 2>&1 \
  || { tail -20 "$OUT.log"; exit 1; }
grep -E "Maximum resident|Elapsed" "$OUT.log" || true
edgediff bench sweep "$OUT" --steps 20 --size 512x512 --guidance 7.5 --cache-interval 3 --cache-branch 1 \
  --runs 3 --json "$OUT.sweep-b1.json" --overwrite
