"""The reference side of ``edgediff bench --compare diffusers``: a separate process (torch never enters ours) that
loads a diffusers pipeline and answers one JSON request per line with per-stage timings and what it ran.

    python -m edgediff.bench.diffusers_worker PIPELINE_DIR --pipeline StableDiffusionXLPipeline \\
        --scheduler-config '{"_class_name": "EulerDiscreteScheduler", ...}'     # then JSON lines on stdin

Like for like with ours: the scheduler is built from the *bundle's* scheduler config (``--scheduler-config``, the
file ours runs with) under the diffusers class our scheduler name stands for, not from the reference folder's, so a
Turbo bundle's ``timestep_spacing="trailing"`` holds on both sides whatever ``--reference`` points at. Each answer
says which timesteps and UNet batch sizes ran, and ``compare`` refuses ratios of two different computations.

Protocol: the first stdout line is ``{"ready": true, "torch": ..., "diffusers": ..., "pipeline": ...}``, then one
line per request: the timings, or ``{"error": "..."}``. Anything diffusers prints goes to stderr, so stdout carries
only these lines.
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgediff.bench.diffusers_worker")
    ap.add_argument("source", help="diffusers pipeline folder")
    ap.add_argument("--pipeline", default="StableDiffusionPipeline", help="diffusers pipeline class to load it as")
    ap.add_argument("--scheduler-config", default=None,
                    help="scheduler config as JSON (the bundle's); default: the source's own")
    args = ap.parse_args(argv)
    protocol, sys.stdout = sys.stdout, sys.stderr  # a stray print from a library must not break the protocol

    def answer(obj: dict) -> None:
        print(json.dumps(obj), file=protocol, flush=True)

    import warnings

    import diffusers
    import torch

    from edgediff.bench.memory import PeakRss
    from edgediff.schedulers import DIFFUSERS_EQUIVALENT

    warnings.simplefilter("ignore")
    diffusers.utils.logging.set_verbosity_error()
    cls = getattr(diffusers, args.pipeline)
    params = inspect.signature(cls.__init__).parameters
    kw = {}
    if "safety_checker" in params:  # SD 1.x/2.x: ours has no safety checker
        kw.update(safety_checker=None, requires_safety_checker=False)
    if "add_watermarker" in params:  # SDXL: ours does not watermark (diffusers does with invisible-watermark)
        kw["add_watermarker"] = False
    if "text_encoder_3" in params and not (Path(args.source) / "text_encoder_3").is_dir():
        kw.update(text_encoder_3=None, tokenizer_3=None)  # an SD3 folder saved without T5: diffusers wants it said
    pipe = cls.from_pretrained(args.source, local_files_only=True, torch_dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    scheduler_config = json.loads(args.scheduler_config) if args.scheduler_config else dict(pipe.scheduler.config)
    spans: dict[str, list[float]] = {}
    unet_batches: list[int] = []

    def timed(name, fn, before=None):
        def wrapper(*a, **k):
            if before is not None:
                before(*a, **k)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spans.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return wrapper

    # The whole prompt encoding, as ours times it: every tokenizer and text encoder (SDXL: both towers), not only
    # text_encoder.forward (which on SDXL would miss text_encoder_2)
    pipe.encode_prompt = timed("text_encoder", pipe.encode_prompt)
    # the denoiser under the span name ours uses ("unet"): SD3's transformer too, which is called with keywords
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    denoiser.forward = timed("unet", denoiser.forward,
                             lambda *a, **k: unet_batches.append(int((a[0] if a else k["hidden_states"]).shape[0])))
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
    answer({"ready": True, "torch": torch.__version__, "diffusers": diffusers.__version__, "pipeline": args.pipeline})
    for line in sys.stdin:
        try:
            req = json.loads(line)
            sched_cls, extra = DIFFUSERS_EQUIVALENT[req["scheduler"]]
            pipe.scheduler = getattr(diffusers, sched_cls).from_config(scheduler_config, **extra)
            pipe.scheduler.step = timed("scheduler", pipe.scheduler.step)
            spans.clear()
            unet_batches.clear()
            with PeakRss() as mem:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    length = {"max_sequence_length": req["max_sequence_length"]} \
                        if req.get("max_sequence_length") else {}  # SD3/FLUX: T5's token count as ours
                    pipe(req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
                         height=req["height"], width=req["width"], num_images_per_prompt=req["batch"],
                         generator=torch.Generator().manual_seed(req["seed"]), output_type="pil", **length)
                total = time.perf_counter() - t0
        except Exception as exc:  # one line back to the parent, which names it; the worker stays usable
            answer({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"})
            continue
        out = {k: sum(v) for k, v in spans.items()}
        out.update(unet_per_call=sum(spans.get("unet", [0.0])) / max(1, len(spans.get("unet", []))), total=total,
                   unet_calls=len(unet_batches), unet_batch=sorted(set(unet_batches)),
                   timesteps=[float(t) for t in pipe.scheduler.timesteps], scheduler_class=sched_cls,
                   timestep_spacing=pipe.scheduler.config.get("timestep_spacing"),
                   peak_rss=mem.peak, max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        answer(out)


if __name__ == "__main__":
    main()
