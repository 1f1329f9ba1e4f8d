#!/usr/bin/env bash
# LoRA hot-swap on ONNX Runtime vs re-export with the LoRA fused, on the SD-1.5-shaped random model (issue 19).
# Two kinds of LoRA (rank 16, UNet + text encoder): "attn" on the attention, projection and feed-forward layers (what
# diffusers/PEFT and kohya train by default), "all" on every resnet convolution too (LoCon-style: 3.1 GiB of the
# 3.4 GiB UNet changes). DIR must hold sd15-random (python -m edgediff.export.random_pipeline sd15 DIR/sd15-random)
# and its export sd15-onnx (edgediff export DIR/sd15-random DIR/sd15-onnx). Run from the repository root
# (tests/lora_fixtures.py makes the random LoRAs) with nothing else running. Prints each swap's time, the resident
# set after it and the process's peak (ru_maxrss).
set -euo pipefail
export DIR=${DIR:-/tmp/meas}
python - <<'PY'
import os, sys
sys.path.insert(0, "tests")
from pathlib import Path
from lora_fixtures import UNET_TARGETS, make_lora
d = Path(os.environ["DIR"])
attn = [t for t in UNET_TARGETS if t not in ("conv1", "conv2")]
for name, seed, targets in (("a", 1, UNET_TARGETS), ("b", 2, UNET_TARGETS), ("c", 3, attn), ("d", 4, attn)):
    if not (d / f"sd15-{name}.safetensors").exists():
        make_lora(d / "sd15-random", d / f"sd15-{name}.safetensors", seed=seed, rank=16, alpha=16, magnitude=0.01,
                  unet_targets=targets)
PY
/usr/bin/time -v edgediff export "$DIR/sd15-random" "$DIR/sd15-onnx-lora" --lora "$DIR/sd15-c.safetensors:0.8" \
  --overwrite 2>&1 | grep -E "Elapsed|Maximum resident"
rm -rf "$DIR/sd15-onnx-lora"
for kind in "all a b" "attn c d"; do
  set -- $kind
  KIND=$1 A=$DIR/sd15-$2.safetensors B=$DIR/sd15-$3.safetensors python - <<'PY'
import os, re, resource, time
from edgediff import Pipeline
A, B = os.environ["A"], os.environ["B"]
def mem():
    cur = int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 2**20
    return f"rss {cur:.2f} GiB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
print(f"-- LoRA on {os.environ['KIND']} layers")
t = time.perf_counter(); pipe = Pipeline.load(f"{os.environ['DIR']}/sd15-onnx"); print(f"load        {time.perf_counter()-t:5.1f} s  {mem()}")
for name, loras in (("base -> A", {A: 0.8}), ("A -> B", {B: 0.8}), ("B -> A", {A: 0.8}), ("A -> base", {})):
    t = time.perf_counter(); pipe.set_loras(loras); print(f"{name:<11} {time.perf_counter()-t:5.1f} s  {mem()}")
PY
done
