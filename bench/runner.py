"""Measure one configuration: cold start, per-stage latency over runs after warm-up, loop overhead, throughput,
peak memory, and optionally ONNX Runtime's per-operator profile of the denoiser."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgediff.defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from edgediff.errors import InputError

from .memory import PeakRss
from .stats import summarize

STAGES = ("tokenize", "text_encoder", "unet", "scheduler", "vae_decode", "postprocess", "total")
LOOP_SPANS = ("scheduler", "step")  # a step's spans that are not its backend call (runtime/job.py)


@dataclass(frozen=True)
class BenchConfig:
    bundle: str
    backend: str = "cpu"
    steps: int = DEFAULT_STEPS  # the CLI passes the bundle's own (Bundle.default_steps) when --steps is not given
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str | None = None
    warmup: int = 1
    runs: int = 3
    seed: int = 0
    low_memory: bool = False
    prompt: str = ""  # "" = prompt_for(bundle)
    control_image: str | None = None  # ControlNet: the control image of every generation (runtime/controlnet.py)
    controlnets: tuple[str, ...] = ()  # the bundle's ControlNets it goes to (empty: the bundle's only one)

    def __post_init__(self) -> None:
        if not self.prompt:
            object.__setattr__(self, "prompt", prompt_for(self.bundle))
        # Refused, never replaced: a config records what was measured
        for name in ("steps", "batch", "runs"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} {getattr(self, name)}; must be at least 1")
        if self.warmup < 0:
            raise InputError(f"--warmup {self.warmup}; must be 0 or more")

    def call_kwargs(self) -> dict[str, Any]:
        images = [self.control_image] * len(self.controlnets) if len(self.controlnets) > 1 else self.control_image
        control = {} if self.control_image is None else dict(control_image=images,
                                                             controlnets=list(self.controlnets) or None)
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.height, width=self.width,
                    num_images_per_prompt=self.batch, scheduler=self.scheduler, seed=self.seed, **control)


PROMPT = "a photograph of an astronaut riding a horse"
# The built-in model's 24-token tokenizer knows only its captions: the SD prompt would be cut (with a warning)
BUILTIN_PROMPT = "a small red circle in the top left corner on a white background"


def prompt_for(bundle: str) -> str:
    """The fixed prompt every measurement of ``bundle`` uses: the README's for the built-in model, else PROMPT."""
    from edgediff.builtin_model import default_bundle

    return BUILTIN_PROMPT if Path(bundle).resolve() == Path(default_bundle()).resolve() else PROMPT


@dataclass
class Row:
    """One configuration's results: the JSON row (schema in docs/bench.md)."""

    config: dict
    load_seconds: float
    first_image_seconds: float
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> Summary dict (seconds)
    overhead: dict = field(default_factory=dict)
    images_per_second: float = 0.0
    latency_per_image: float = 0.0
    peak_rss_bytes: int | None = None
    cold_start: dict | None = None
    ops: list[dict] | None = None
    compare: dict | None = None
    variant: dict | None = None  # which bundle: path, digest, precision per component, size, transforms
    lever: dict | None = None  # a speed option measured against the plain run (bench/quality.py): ratios, PSNR, SSIM
    trace_spans: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("trace_spans")
        return d


class Samples:
    """The stage samples of a configuration's timed generations, added one ``GenerationResult`` at a time (by
    ``measure``, and by ``quality.measure_levers``, which interleaves several configurations)."""

    def __init__(self) -> None:
        self.per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        self.overhead_us: list[float] = []
        self.overhead_frac: list[float] = []
        self.totals: list[float] = []
        self.unet_per_image: list[float] = []  # each generation's backend calls over all steps, per image

    def add(self, res) -> None:
        self.totals.append(res.timings["total"])
        for s in ("tokenize", "text_encoder", "vae_decode", "postprocess", "total"):
            # only stages the family times apart: SDXL's one text_encoder span covers both tokenizers and both
            # towers, so it has no tokenize stage (not a tokenize stage of 0 ms)
            if s in res.timings:
                self.per_stage[s].append(res.timings[s])
        by_step: dict[int, dict[str, float]] = {}
        for sp in res.spans:
            if sp.step is not None:
                by_step.setdefault(sp.step, {}).setdefault(sp.name, 0.0)
                by_step[sp.step][sp.name] += sp.seconds
        unet = 0.0
        for st in by_step.values():
            # the step's backend call, whichever graph ran it (an extension may pick another, e.g. DeepCache's
            # shallow UNet, whose span carries that graph's name): every span in the step but these two
            call = sum(v for k, v in st.items() if k not in LOOP_SPANS)
            unet += call
            self.per_stage["unet"].append(call)
            self.per_stage["scheduler"].append(st.get("scheduler", 0.0))
            outside = st.get("step", 0.0) - call  # everything in the loop but the backend call
            self.overhead_us.append(outside * 1e6)
            self.overhead_frac.append(outside / st["step"] if st.get("step") else 0.0)
        self.unet_per_image.append(unet / len(res.seeds))  # one seed per image

    def row(self, cfg: BenchConfig, *, load: float, first: float, peak_rss: int | None) -> Row:
        mean_total = sum(self.totals) / len(self.totals)
        return Row(
            config=asdict(cfg), load_seconds=load, first_image_seconds=first,
            stages={s: summarize(v).to_dict() for s, v in self.per_stage.items() if v},
            overhead={"per_step_us": summarize(self.overhead_us).to_dict(),
                      "percent_of_step": 100.0 * sum(self.overhead_frac) / len(self.overhead_frac)},
            images_per_second=cfg.batch / mean_total, latency_per_image=mean_total / cfg.batch,
            peak_rss_bytes=peak_rss,
        )


def measure(cfg: BenchConfig, *, pipe=None) -> Row:
    """One configuration's timed generations on ``pipe`` (loaded here when None). The operator profile
    (``op_profile``) is a separate step: it loads a second pipeline, so the caller closes this one first."""
    from edgediff import Pipeline

    t0 = time.perf_counter()
    if pipe is None:
        pipe = Pipeline.load(cfg.bundle, backend=cfg.backend, low_memory=cfg.low_memory)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(cfg.prompt, **cfg.call_kwargs())
    first = time.perf_counter() - t0
    for _ in range(max(0, cfg.warmup - 1)):  # the first image above counts as one warm-up
        pipe(cfg.prompt, **cfg.call_kwargs())
    samples = Samples()
    spans = []
    with PeakRss() as mem:
        for r in range(cfg.runs):
            res = pipe(cfg.prompt, **{**cfg.call_kwargs(), "seed": cfg.seed + 1000 * (r + 1)})
            spans = res.spans
            samples.add(res)
    row = samples.row(cfg, load=load, first=first, peak_rss=mem.peak)
    row.trace_spans = list(spans)
    return row


def op_profile(cfg: BenchConfig, top: int) -> list[dict]:
    """Top-N operator types of the denoiser by total time over one generation, from the backend's own profiler
    (the optional Profiling capability of the Backend seam: ONNX Runtime's backends have it)."""
    import tempfile

    from edgediff import Pipeline
    from edgediff.backends import PROFILING, profiling_options
    from edgediff.backends.base import profiler

    if cfg.backend not in PROFILING:
        raise InputError(f"--profile-ops needs a backend that can profile: {'/'.join(PROFILING)} (ONNX Runtime); "
                         f"{cfg.backend!r} cannot")
    with tempfile.TemporaryDirectory() as tmp:
        opts = profiling_options(cfg.backend, tmp)
        pipe = Pipeline.load(cfg.bundle, backend=cfg.backend, options=opts)
        try:
            pipe(cfg.prompt, **cfg.call_kwargs())
            by_op = profiler(pipe.components.get(pipe.bundle.denoiser)).stop_profiling()
        finally:
            pipe.close()
    total = sum(by_op.values()) or 1.0
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": op, "seconds": sec, "percent": 100.0 * sec / total} for op, sec in ranked]


def cold_start(cfg: BenchConfig) -> dict:
    """A fresh process: interpreter + imports, pipeline load (sessions created), first image — each separately."""
    code = (
        "import time, json, sys; t=[time.time()]\n"
        "from edgediff import Pipeline; import edgediff.pipeline; t.append(time.time())\n"
        f"p = Pipeline.load({cfg.bundle!r}, backend={cfg.backend!r}, low_memory={cfg.low_memory!r}); t.append(time.time())\n"
        f"p({cfg.prompt!r}, **{cfg.call_kwargs()!r}); t.append(time.time())\n"
        "print(json.dumps(t))\n"
    )
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise InputError(f"cold-start run failed: {last}")
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return {"process_to_imports": t[1] - start, "load": t[2] - t[1], "first_image": t[3] - t[2], "total": t[3] - start}
