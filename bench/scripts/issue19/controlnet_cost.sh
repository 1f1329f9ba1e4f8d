#!/usr/bin/env bash
# ControlNet step cost vs the plain step, and the plain path of a ControlNet bundle vs a bundle without ControlNet, on
# the SD-1.5-shaped random model (issue 19). DIR must hold sd15-random (python -m edgediff.export.random_pipeline sd15
# DIR/sd15-random) and its plain export sd15-onnx (edgediff export DIR/sd15-random DIR/sd15-onnx). Run from the
# repository root with nothing else running. Writes DIR/cn-*.json (bench/schema.json) and prints the tables.
set -euo pipefail
export DIR=${DIR:-/tmp/meas}
STEPS=${STEPS:-20}
RUNS=${RUNS:-5}
# An SD-1.5-shaped ControlNet (diffusers' ControlNetModel.from_unet: the UNet's encoder, the 8x conditioning
# embedding of the real ControlNets); its weights are random, which does not change its compute or memory.
[ -d "$DIR/sd15-controlnet" ] || python - <<'PY'
import os
from diffusers import ControlNetModel, UNet2DConditionModel
d = os.environ["DIR"]
net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(f"{d}/sd15-random", subfolder="unet"))
net.save_pretrained(f"{d}/sd15-controlnet", safe_serialization=True)
PY
[ -d "$DIR/sd15-onnx-cn" ] || /usr/bin/time -v edgediff export "$DIR/sd15-random" "$DIR/sd15-onnx-cn" \
  --controlnet "$DIR/sd15-controlnet:canny" 2>&1 | grep -E "Elapsed|Maximum resident|wrote"
du -sh "$DIR/sd15-onnx-cn"/{unet,unet_controlnet,controlnet_canny}
python -c "import numpy as np; from PIL import Image; Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save('$DIR/control.png')"
common=(--steps "$STEPS" --runs "$RUNS" --warmup 1 --scheduler euler --size 512x512 --overwrite)
# 1. ControlNet step cost: the same bundle with and without a control image (stage "unet" = the step's model calls:
#    ControlNet + unet_controlnet with the image, the plain unet without)
edgediff bench run "$DIR/sd15-onnx-cn" "${common[@]}" --control-image "$DIR/control.png" --controlnet canny \
  --json "$DIR/cn-with-control.json"
edgediff bench run "$DIR/sd15-onnx-cn" "${common[@]}" --json "$DIR/cn-plain.json"
# 2. No slowdown of the plain path (goal <= 1 %): the ControlNet bundle without a control image vs the plain bundle
edgediff bench sweep "$DIR/sd15-onnx" "$DIR/sd15-onnx-cn" "${common[@]}" --json "$DIR/cn-plain-vs-plain.json"
# 3. Per-step split of a ControlNet step: ControlNet vs the residual UNet (spans of one generation)
python - <<'PY'
import os
from edgediff import Pipeline
d = os.environ["DIR"]
pipe = Pipeline.load(f"{d}/sd15-onnx-cn")
kw = dict(num_inference_steps=int(os.environ.get("STEPS", 20)), scheduler="euler", height=512, width=512, seed=0)
pipe("a photograph of an astronaut riding a horse", **kw, control_image=f"{d}/control.png", controlnets="canny")
r = pipe("a photograph of an astronaut riding a horse", **kw, control_image=f"{d}/control.png", controlnets="canny")
p = pipe("a photograph of an astronaut riding a horse", **kw)
n = kw["num_inference_steps"]
print(f"per step: controlnet {r.timings.get('controlnet', 0) / n * 1e3:.0f} ms + unet_controlnet "
      f"{r.timings.get('unet_controlnet', 0) / n * 1e3:.0f} ms vs plain unet {p.timings.get('unet', 0) / n * 1e3:.0f} ms")
PY
