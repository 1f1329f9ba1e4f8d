"""The reference side of ``edgediff bench --compare diffusers``: a separate process (torch never enters ours) that
loads a diffusers pipeline and answers one JSON request per line with per-stage timings.

    python -m edgediff.bench.diffusers_worker PIPELINE_DIR    # then JSON lines on stdin
"""
from __future__ import annotations

import json
import sys
import time


def main(src: str) -> None:
    import warnings

    import torch
    import diffusers

    from edgediff.schedulers import DIFFUSERS_EQUIVALENT

    warnings.simplefilter("ignore")
    diffusers.utils.logging.set_verbosity_error()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False,
                                                             local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_scheduler = pipe.scheduler
    spans: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spans.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return wrapper

    pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timed("unet", pipe.unet.forward)
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
    print(json.dumps({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        name = req.get("scheduler")
        if name:
            cls, extra = DIFFUSERS_EQUIVALENT[name]
            pipe.scheduler = getattr(diffusers, cls).from_config(base_scheduler.config, **extra)
        pipe.scheduler.step = timed("scheduler", pipe.scheduler.step)
        spans.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
                 height=req["height"], width=req["width"], num_images_per_prompt=req["batch"],
                 generator=torch.Generator().manual_seed(req["seed"]), output_type="np")
        total = time.perf_counter() - t0
        out = {k: sum(v) for k, v in spans.items()}
        out["unet_per_call"] = sum(spans.get("unet", [0])) / max(1, len(spans.get("unet", [])))
        out["total"] = total
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
