#!/usr/bin/env bash
# LoRA hot-swap on ONNX Runtime vs re-export with the LoRA fused, on the SD-1.5-shaped random model (issue 19).
# DIR must hold sd15-random (python -m edgediff.export.random_pipeline sd15 DIR/sd15-random) and its export
# sd15-onnx (edgediff export DIR/sd15-random DIR/sd15-onnx). Run from the repository root (tests/lora_fixtures.py
# makes the two random LoRAs), with nothing else running.
set -euo pipefail
export DIR=${DIR:-/tmp/meas}
python -c "import os, sys; sys.path.insert(0, 'tests'); from pathlib import Path; from lora_fixtures import make_lora; d = Path(os.environ['DIR']); [make_lora(d / 'sd15-random', d / f'sd15-{n}.safetensors', seed=s, rank=16, alpha=16, magnitude=0.01) for n, s in (('a', 1), ('b', 2))]"
/usr/bin/time -v edgediff export "$DIR/sd15-random" "$DIR/sd15-onnx-a" --lora "$DIR/sd15-a.safetensors:0.8" 2>&1 \
  | grep -E "Elapsed|Maximum resident"
python - <<'EOF'
import os, resource, time
from edgediff import Pipeline
d = os.environ["DIR"]
gib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
A, B = f"{d}/sd15-a.safetensors", f"{d}/sd15-b.safetensors"
t = time.perf_counter(); pipe = Pipeline.load(f"{d}/sd15-onnx"); print(f"load (base)  {time.perf_counter()-t:6.1f} s  peak {gib():.2f} GiB")
for name, l in (("base -> A", {A: 0.8}), ("A -> B", {B: 0.8}), ("B -> A", {A: 0.8}), ("A -> base", {})):
    t = time.perf_counter(); pipe.set_loras(l); print(f"{name:<12} {time.perf_counter()-t:6.1f} s  peak {gib():.2f} GiB")
EOF
