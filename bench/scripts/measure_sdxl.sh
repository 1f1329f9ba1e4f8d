#!/usr/bin/env bash
# Issue 16's SDXL measurements on this machine, in one go, each figure next to the command that produced it:
#   (a) build a random SDXL-shaped diffusers pipeline             python -m edgediff.export.random_pipeline PRESET
#   (b) export it: wall time and peak RSS (the largest process, and the whole process tree)
#   (c) edgediff bench --compare diffusers: 1 step at SIZE (UNet step, CFG batch 2) and a Turbo-style 1-step
#       TURBO_SIZE run at guidance 0 (UNet batch 1, Euler a): ours/diffusers ratios from one run each
#   (d) peak RSS of one SIZE generation, each a fresh process, load included: edgediff generate vs the diffusers
#       worker running StableDiffusionXLPipeline
#   (e) optimize --target cpu (the UNet's attention fused from the graph's structure when its weights are too big
#       for ONNX Runtime's optimizer), then (c) again on the optimized bundle; quantize --int8-storage, then a
#       --low-memory SIZE generation's peak RSS (and fp32 --low-memory for reference)
#   (f) INT8 arithmetic: quantize --int8, optimize --target cpu, (c) again, and the image's difference from fp32's
#
# Usage (from the repository root, in the environment with edgediff[export] installed):
#   bash bench/scripts/measure_sdxl.sh PRESET DIR
#     PRESET  sdxl       the full-size SDXL base shapes (2.6 B-parameter UNet, 10.3 GB fp32): about 20 GB peak and
#                        hours on 2 cores; run it on a quiet machine
#             tiny-sdxl  the test-sized model: the same commands end to end in a few minutes (a dry run)
#     DIR     working folder: src/ (the pipeline), bundle*/ (bundles), out/ (images), logs/ (each command's output
#             and /usr/bin/time -v report), results/ (JSON; results/summary.json at the end)
#   Steps whose output already exists are skipped (delete it to measure again), so an interrupted run resumes.
#   Environment overrides: SIZE (default 1024x1024; tiny: 64x64), TURBO_SIZE (512x512; tiny: 32x32), RUNS (timed
#   runs per side, default 2), COMPARE_ORDER (sequential: both SDXL pipelines do not fit in 24 GB together),
#   INT8_COMPONENTS (unet), INT8_COMPUTE (1; 0 skips step (f)), PROMPT, OPTIMIZE (1; 0 skips step (e)'s optimize and quantizes the exported bundle;
#   optimize's peak was 17.0 GiB for SDXL at 1024x1024, in its parity check).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[[ $# -eq 2 ]] || usage
PRESET=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd) || { echo "error: cannot create $2" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
case $PRESET in
  sdxl) SIZE=${SIZE:-1024x1024}; TURBO_SIZE=${TURBO_SIZE:-512x512} ;;
  tiny-sdxl) SIZE=${SIZE:-64x64}; TURBO_SIZE=${TURBO_SIZE:-32x32} ;;
  *) echo "error: PRESET must be sdxl or tiny-sdxl, not '$PRESET'" >&2; exit 2 ;;
esac
RUNS=${RUNS:-2}
COMPARE_ORDER=${COMPARE_ORDER:-sequential}
INT8_COMPONENTS=${INT8_COMPONENTS:-unet}
PROMPT=${PROMPT:-a photograph of an astronaut riding a horse}
PY=${PYTHON:-python}
command -v edgediff >/dev/null || { echo "error: edgediff is not on PATH: activate the environment first" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "error: /usr/bin/time is missing (apt-get install time)" >&2; exit 2; }

SRC=$DIR/src BUNDLE=$DIR/bundle OPT=$DIR/bundle-cpu INT8=$DIR/bundle-cpu-int8s Q8=$DIR/bundle-i8 Q8OPT=$DIR/bundle-i8-cpu
LOGS=$DIR/logs RES=$DIR/results OUT=$DIR/out
mkdir -p "$LOGS" "$RES" "$OUT"
H=${SIZE#*x} W=${SIZE%x*}
FAILED=()

# measure NAME CMD...: run CMD under /usr/bin/time -v (-> logs/NAME.time) and the process-tree sampler
# (-> results/NAME.tree.json), its output to logs/NAME.log; a failure is recorded and the script goes on
measure() {
  local name=$1; shift
  echo "== $name: $*"
  "$PY" "$HERE/tree_rss.py" "$RES/$name.tree.json" -- /usr/bin/time -v -o "$LOGS/$name.time" "$@" \
    >"$LOGS/$name.log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name (exit $rc; see $LOGS/$name.log)")
    echo "   FAILED (exit $rc): $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1)"
  else
    touch "$RES/$name.ok"
    echo "   $(grep -E 'Elapsed|Maximum resident' "$LOGS/$name.time" | sed 's/^\s*//' | paste -sd ';' -)"
  fi
  return $rc
}

# skip NAME PATH: true (and a line) when PATH, written only by a successful run, exists from an earlier one
skip() { [[ -e $2 ]] && echo "== $1: $2 exists, kept (delete it to measure again)"; }

# (a) the random pipeline
skip build "$SRC/model_index.json" || measure build "$PY" -m edgediff.export.random_pipeline "$PRESET" "$SRC"

# (b) export
skip export "$BUNDLE/edgediff.json" || measure export edgediff export "$SRC" "$BUNDLE"
[[ -e $BUNDLE/edgediff.json ]] || { echo "error: no bundle to measure: ${FAILED[*]}" >&2; exit 1; }

# (c) speed against diffusers, one --compare run each. Guidance: the bundle's default (SDXL: 5.0, CFG batch 2).
# Turbo-style: same weights, 1 step at guidance 0 with Euler a; diffusers runs the bundle's scheduler config too
# (random weights: the timesteps change the values, not the work)
skip bench-cfg "$RES/bench-cfg.json" || measure bench-cfg edgediff bench "$BUNDLE" --size "$SIZE" --steps 1 \
  --runs "$RUNS" --warmup 0 --compare diffusers --compare-order "$COMPARE_ORDER" --json "$RES/bench-cfg.json"
skip bench-turbo "$RES/bench-turbo.json" || measure bench-turbo edgediff bench "$BUNDLE" --size "$TURBO_SIZE" \
  --steps 1 --guidance 0 --scheduler euler_a --runs "$RUNS" --warmup 0 --compare diffusers \
  --compare-order "$COMPARE_ORDER" --json "$RES/bench-turbo.json"

# (d) one SIZE generation per fresh process, load included: ours, then diffusers through the bench's worker
# (same prompt, 1 step, guidance 5, Euler, seed 0; the worker answers one JSON line per request on stdin)
skip gen-ours "$OUT/ours.png" || measure gen-ours edgediff generate "$PROMPT" -m "$BUNDLE" --size "$SIZE" \
  --steps 1 --guidance 5 --scheduler euler --seed 0 -o "$OUT/ours.png" --overwrite
REQUEST=$("$PY" -c 'import json, sys; print(json.dumps(dict(prompt=sys.argv[1], steps=1, guidance=5.0,
  height=int(sys.argv[2]), width=int(sys.argv[3]), batch=1, seed=0, scheduler="euler")))' "$PROMPT" "$H" "$W")
skip gen-diffusers "$RES/gen-diffusers.ok" || measure gen-diffusers bash -c \
  'echo "$1" | "$2" -m edgediff.bench.diffusers_worker "$3" --pipeline StableDiffusionXLPipeline > "$4" &&
   ! grep -H "\"error\"" "$4"' _ \
  "$REQUEST" "$PY" "$SRC" "$RES/gen-diffusers.worker.jsonl"

# (e) low memory: fp32 --low-memory, then optimize --target cpu -> quantize --int8-storage -> --low-memory
skip gen-lowmem "$OUT/lowmem.png" || measure gen-lowmem edgediff generate "$PROMPT" -m "$BUNDLE" \
  --low-memory --size "$SIZE" --steps 1 --guidance 5 --scheduler euler --seed 0 -o "$OUT/lowmem.png" --overwrite
if [[ ${OPTIMIZE:-1} == 1 ]]; then
  skip optimize "$OPT/edgediff.json" || measure optimize edgediff optimize "$BUNDLE" "$OPT" --target cpu
fi
if [[ -e $OPT/edgediff.json ]]; then  # (c) on the optimized bundle (fused attention); diffusers as before
  skip bench-cfg-opt "$RES/bench-cfg-opt.json" || measure bench-cfg-opt edgediff bench "$OPT" --size "$SIZE" \
    --steps 1 --runs "$RUNS" --warmup 0 --compare diffusers --compare-order "$COMPARE_ORDER" \
    --json "$RES/bench-cfg-opt.json"
  skip bench-turbo-opt "$RES/bench-turbo-opt.json" || measure bench-turbo-opt edgediff bench "$OPT" \
    --size "$TURBO_SIZE" --steps 1 --guidance 0 --scheduler euler_a --runs "$RUNS" --warmup 0 --compare diffusers \
    --compare-order "$COMPARE_ORDER" --json "$RES/bench-turbo-opt.json"
  skip gen-opt "$OUT/opt.png" || measure gen-opt edgediff generate "$PROMPT" -m "$OPT" --size "$SIZE" \
    --steps 1 --guidance 5 --scheduler euler --seed 0 -o "$OUT/opt.png" --overwrite
fi
INT8_FROM=$OPT
if [[ ! -e $OPT/edgediff.json ]]; then  # optimize failed (memory?): --int8-storage also takes the exported bundle
  INT8_FROM=$BUNDLE INT8=$DIR/bundle-int8s
  echo "   no optimized bundle: quantizing $BUNDLE instead"
fi
skip quantize "$INT8/edgediff.json" || measure quantize edgediff quantize "$INT8_FROM" "$INT8" --int8-storage \
  --components "$INT8_COMPONENTS"
if [[ -e $INT8/edgediff.json ]]; then
  skip gen-int8s-lowmem "$OUT/int8s-lowmem.png" || measure gen-int8s-lowmem edgediff generate "$PROMPT" \
    -m "$INT8" --low-memory --size "$SIZE" --steps 1 --guidance 5 --scheduler euler --seed 0 \
    -o "$OUT/int8s-lowmem.png" --overwrite
fi

# (f) INT8 arithmetic (VNNI/AMX integer kernels): quantize --int8 (TensorRT layout, every projection INT8; calibrated
# at TURBO_SIZE, 2 prompts x 4 steps), optimize --target cpu (attention fused behind the Q/DQ projections), then
# (c) again -- against diffusers fp32 -- and the same 1-step SIZE image as (d), for its difference from fp32's
if [[ ${INT8_COMPUTE:-1} == 1 ]]; then
  skip quantize-int8 "$Q8/edgediff.json" || measure quantize-int8 edgediff quantize "$BUNDLE" "$Q8" --int8 \
    --size "$TURBO_SIZE" --calib-size 2 --steps 4
  [[ -e $Q8/edgediff.json ]] && { skip optimize-int8 "$Q8OPT/edgediff.json" || measure optimize-int8 \
    edgediff optimize "$Q8" "$Q8OPT" --target cpu; }
  if [[ -e $Q8OPT/edgediff.json ]]; then
    skip bench-cfg-int8 "$RES/bench-cfg-int8.json" || measure bench-cfg-int8 edgediff bench "$Q8OPT" \
      --size "$SIZE" --steps 1 --runs "$RUNS" --warmup 0 --compare diffusers --compare-order "$COMPARE_ORDER" \
      --json "$RES/bench-cfg-int8.json"
    skip bench-turbo-int8 "$RES/bench-turbo-int8.json" || measure bench-turbo-int8 edgediff bench "$Q8OPT" \
      --size "$TURBO_SIZE" --steps 1 --guidance 0 --scheduler euler_a --runs "$RUNS" --warmup 0 \
      --compare diffusers --compare-order "$COMPARE_ORDER" --json "$RES/bench-turbo-int8.json"
    skip gen-int8 "$OUT/int8.png" || measure gen-int8 edgediff generate "$PROMPT" -m "$Q8OPT" --size "$SIZE" \
      --steps 1 --guidance 5 --scheduler euler --seed 0 -o "$OUT/int8.png" --overwrite
  fi
fi

# The summary: every figure from the files above, also written to results/summary.json
"$PY" - "$DIR" "$PRESET" "$SIZE" "$TURBO_SIZE" "$(basename "$INT8_FROM")" <<'EOF'
import json, re, sys
from pathlib import Path

d, preset, size, turbo_size, int8_from = Path(sys.argv[1]), *sys.argv[2:]
logs, res = d / "logs", d / "results"
GiB = 2**30


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def timed(name):
    """/usr/bin/time -v: wall seconds and the largest single process's peak RSS; the sampled process-tree peak."""
    try:
        text = (logs / f"{name}.time").read_text()
    except OSError:
        return None
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else None
    tree = load(res / f"{name}.tree.json") or {}
    return {"wall_s": seconds, "max_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
            "tree_peak_bytes": tree.get("tree_peak_bytes"), "returncode": tree.get("returncode")}


def gib(v):
    return f"{v / GiB:6.2f} GiB" if v else "     n/a"


summary = {"preset": preset, "size": size, "turbo_size": turbo_size, "int8_storage_of": int8_from, "steps": {},
           "compare": {}}
lines = [f"SDXL measurements, preset {preset}, {d}"]
for name in ("build", "export", "optimize", "quantize", "quantize-int8", "optimize-int8"):
    t = timed(name)
    if t:
        summary["steps"][name] = t
        lines.append(f"  {name:<10} wall {t['wall_s'] or 0:8.1f} s   peak RSS {gib(t['max_rss_bytes'])} (largest "
                     f"process)  {gib(t['tree_peak_bytes'])} (process tree)")
for name, label in (("bench-cfg", f"{size}, 1 step, bundle guidance"),
                    ("bench-turbo", f"Turbo-style {turbo_size}, 1 step, guidance 0, euler_a"),
                    ("bench-cfg-opt", f"optimized bundle, {size}, 1 step, bundle guidance"),
                    ("bench-turbo-opt", f"optimized bundle, Turbo-style {turbo_size}, 1 step, guidance 0, euler_a"),
                    ("bench-cfg-int8", f"INT8 optimized bundle, {size}, 1 step, bundle guidance"),
                    ("bench-turbo-int8", f"INT8 optimized bundle, Turbo-style {turbo_size}, 1 step, guidance 0, "
                                         "euler_a")):
    doc = load(res / f"{name}.json")
    if not doc:
        lines.append(f"  {label}: no result (see logs/{name}.log)")
        continue
    row = doc["results"][0]
    cmp = row["compare"]
    summary["compare"][name] = {"config": row["config"], "computation": cmp.get("computation"), "ours": cmp["ours"],
                                "theirs": cmp["theirs"], "ratio": cmp["ratio"], "peak_rss_bytes": cmp["peak_rss_bytes"]}
    lines.append(f"  {label} (UNet batch {cmp['computation']['unet_batch'][0]}, {cmp['order']}), ours/diffusers:")
    for k in ("unet_per_call", "text_encoder", "vae_decode", "total"):
        r = cmp["ratio"].get(k)
        goal = "  (goal <= 0.8x)" if (name.removesuffix("-opt").removesuffix("-int8"), k) in (("bench-cfg", "unet_per_call"),
                                                                         ("bench-turbo", "total")) else ""
        lines.append(f"    {k:<14} {cmp['ours'][k]:9.3f} s vs {cmp['theirs'][k]:9.3f} s = {r:.3f}x{goal}"
                     if r is not None else f"    {k:<14} n/a")
    m = cmp["peak_rss_bytes"]
    lines.append(f"    peak RSS during generation {gib(m['ours'])} vs {gib(m['theirs'])}"
                 + (f" = {m['ratio']:.3f}x" if m.get("ratio") else ""))
gens = {"gen-ours": "ours, fp32", "gen-opt": "ours, fp32, optimize --target cpu",
        "gen-int8": "ours, quantize --int8 + optimize --target cpu",
        "gen-diffusers": "diffusers StableDiffusionXLPipeline, fp32",
        "gen-lowmem": "ours, fp32, --low-memory",
        "gen-int8s-lowmem": f"ours, int8-storage of {int8_from}, --low-memory"}
lines.append(f"  one {size} generation in a fresh process (load included), peak RSS:")
for name, label in gens.items():
    t = timed(name)
    if t:
        summary["steps"][name] = t
        goal = "  goal <= 6 GiB" if name == "gen-int8s-lowmem" else ""
        lines.append(f"    {label:<42} {gib(t['max_rss_bytes'])}  (process tree {gib(t['tree_peak_bytes'])}, "
                     f"wall {t['wall_s'] or 0:.1f} s){goal}")
worker = [json.loads(x) for x in (res / "gen-diffusers.worker.jsonl").read_text().splitlines()
          if x.strip()] if (res / "gen-diffusers.worker.jsonl").is_file() else []
if len(worker) > 1 and "peak_rss" in worker[1]:
    summary["diffusers_generation_peak_rss_bytes"] = worker[1]["peak_rss"]
    lines.append(f"    (diffusers during the generation alone: {gib(worker[1]['peak_rss'])})")
ours, theirs = timed("gen-ours"), timed("gen-diffusers")
if ours and theirs and ours["max_rss_bytes"] and theirs["max_rss_bytes"]:
    summary["generation_peak_ratio"] = ours["max_rss_bytes"] / theirs["max_rss_bytes"]
    lines.append(f"    ours/diffusers = {summary['generation_peak_ratio']:.3f}x (goal <= 1)")
if (d / "out" / "int8.png").is_file() and (d / "out" / "ours.png").is_file():
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(d / "out" / f), dtype=np.float64) for f in ("ours.png", "int8.png"))
    mse = float(np.mean((a - b) ** 2))
    summary["int8_image"] = {"max_abs_255": float(np.abs(a - b).max()),
                             "psnr_db": 10 * np.log10(255.0**2 / mse) if mse else float("inf")}
    lines.append(f"  INT8 image vs fp32 (same seed): max |diff| {summary['int8_image']['max_abs_255']:.0f}/255, "
                 f"PSNR {summary['int8_image']['psnr_db']:.1f} dB")
(res / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print("\n".join(lines))
EOF

if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'failed: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
