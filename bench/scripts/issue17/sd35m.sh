#!/usr/bin/env bash
# Issue 17: the SD3.5-medium-shaped random pipeline (2.5 B transformer; no T5-XXL, which does not fit next to it in
# 24 GB): build, export (wall time, largest process's and whole tree's peak RSS), then ours vs diffusers in one
# --compare run at 512x512, 4 steps (transformer step with CFG batch 2, end to end, peak RSS of each side).
#   bash bench/scripts/issue17/sd35m.sh DIR      (~13 GB for the source and ~13 GB for the bundle; ~45 min at 2 cores)
set -uo pipefail
D=${1:?usage: sd35m.sh DIR}; mkdir -p "$D"; HERE=$(cd "$(dirname "$0")/.." && pwd)
[[ -e $D/src/model_index.json ]] || /usr/bin/time -v -o "$D/build.time" python -m edgediff.export.random_pipeline sd35m "$D/src"
[[ -e $D/bundle/edgediff.json ]] || python "$HERE/tree_rss.py" "$D/export.tree.json" -- \
  /usr/bin/time -v -o "$D/export.time" edgediff export "$D/src" "$D/bundle"
grep -E "Elapsed|Maximum resident" "$D/export.time"
edgediff bench run "$D/bundle" --size 512x512 --steps 4 --warmup 0 --runs 1 --compare diffusers \
  --compare-order sequential --json "$D/compare.json" --overwrite
