"""``--compare diffusers``: ours in this process, the same configuration in diffusers in a worker process
(``diffusers_worker``), ratios ours/theirs of the means.

Like for like: the worker loads the diffusers pipeline class of the bundle's family, runs the scheduler our name
stands for under the bundle's own scheduler config, with the same prompt, size, steps, guidance, batch and seed;
afterwards the timesteps and UNet batches each side ran are compared, and a difference is an error, not a ratio.

Order: ``alternate`` (ours, theirs, ours, ... after one warm-up each: drift on a shared machine hits both alike)
needs both pipelines in memory at once; ``sequential`` runs all of ours, closes our pipeline, then all of theirs
(an SDXL UNet is 10 GB in fp32 on each side: both do not fit a 24 GB machine). ``auto`` alternates when they fit.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgediff.bundle import layout
from edgediff.errors import BackendError, InputError, MissingDependency

from .memory import PeakRss
from .runner import BenchConfig

# family -> the diffusers pipeline that runs its text-to-image (the reference) and the models it loads. The SDXL
# refiner has none: it only refines images, and bench times text-to-image.
_SD = ("StableDiffusionPipeline", ("tokenizer", "text_encoder", "unet", "vae", "scheduler"))
_SDXL = ("StableDiffusionXLPipeline", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae",
                                       "scheduler"))
# SD3: text_encoder_3 (T5) is optional, as in diffusers; the worker loads a folder without it as such
_SD3 = ("StableDiffusion3Pipeline", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae",
                                     "scheduler"))
_FLUX = ("FluxPipeline", ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "vae", "scheduler"))
REFERENCE_PIPELINES = {"sd1": _SD, "sd2": _SD, "sd2-v": _SD, "sd-turbo": _SD, "sdxl": _SDXL, "sdxl-turbo": _SDXL,
                       "lcm": ("LatentConsistencyModelPipeline", _SD[1]),  # the LCM family: SD's folders
                       "sd3": _SD3, "flux": _FLUX}
TIMED = ("text_encoder", "unet_per_call", "scheduler", "vae_decode", "total")  # seconds, mean over runs


def reference_pipeline(family: str) -> str:
    return _reference_for(family)[0]


def _reference_for(family: str) -> tuple[str, tuple[str, ...]]:
    try:
        return REFERENCE_PIPELINES[family]
    except KeyError:
        raise InputError(f"--compare diffusers has no reference for family {family!r} (it has one for "
                         f"{', '.join(REFERENCE_PIPELINES)})") from None


def check_reference(source: Path, family: str) -> None:
    """Refuse a reference the worker could not run, before anything is measured: no torch, no diffusers folder, or
    a folder without the models the family's pipeline loads (an SD folder given for an SDXL bundle)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise MissingDependency("--compare diffusers needs torch and diffusers (in their own process): "
                                "pip install torch==2.13.0 'edgediff[export]'")
    pipeline, needs = _reference_for(family)
    index_path = Path(source) / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--reference {source} is not a diffusers pipeline folder (no model_index.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--reference {source}: model_index.json cannot be read ({exc}); give a diffusers "
                         "pipeline folder") from None
    index = index if isinstance(index, dict) else {}
    missing = [name for name in needs if not (isinstance(index.get(name), list) and None not in index[name])]
    if missing:
        raise InputError(f"--reference {source} cannot run as the {pipeline} this {family} bundle compares with: "
                         f"its model_index.json has no {', '.join(missing)} (it is a {index.get('_class_name')}); "
                         "give the folder the bundle was exported from")


def choose_order(order: str, bundle_bytes: int) -> str:
    """``auto``: alternate when ours (the bundle's weights) and theirs (as many fp32 bytes, and without the
    ``accelerate`` package a second copy while diffusers loads) fit in the memory available now."""
    if order != "auto":
        return order
    from edgediff.validation import available_memory

    have = available_memory()
    return "alternate" if have is None or 3 * bundle_bytes < have else "sequential"


class DiffusersWorker:
    def __init__(self, source: Path, pipeline: str, scheduler_config: dict):
        # stderr to a file, not a pipe nobody reads while the worker runs: a chatty library cannot block it
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgediff.bench.diffusers_worker", str(source),
                                      "--pipeline", pipeline, "--scheduler-config", json.dumps(scheduler_config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        hello = self.proc.stdout.readline()
        if not hello:
            err = self._last_error()
            self.close()
            raise InputError(f"the diffusers reference process failed to start: {err}")
        self.versions = json.loads(hello)

    def run(self, cfg: BenchConfig, *, height: int, width: int, seed: int, scheduler: str,
            max_sequence_length: int | None = None) -> dict:
        req = dict(prompt=cfg.prompt, steps=cfg.steps, guidance=cfg.guidance, height=height, width=width,
                   batch=cfg.batch, seed=seed, scheduler=scheduler, max_sequence_length=max_sequence_length)
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: the empty read below says why
        line = self.proc.stdout.readline()
        if not line:
            raise InputError(f"the diffusers reference run failed: {self._last_error()}")
        out = json.loads(line)
        if "error" in out:
            raise InputError(f"the diffusers reference run failed: {out['error']}")
        return out

    def _last_error(self) -> str:
        self.proc.poll()
        self._stderr.seek(0)
        return (self._stderr.read().strip().splitlines() or ["no output"])[-1]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()
        self._stderr.close()


def ours_run(cfg: BenchConfig, pipe, seed: int) -> dict:
    """One generation of ours, in the worker's terms (``text_encoder`` = the whole prompt encoding)."""
    res = pipe(cfg.prompt, **{**cfg.call_kwargs(), "seed": seed})
    unet = [s.seconds for s in res.spans if s.name == "unet"]
    t = res.timings
    return {"text_encoder": t.get("tokenize", 0.0) + t.get("text_encoder", 0.0),  # SD: two spans; SDXL: one
            "unet_per_call": sum(unet) / len(unet), "unet_calls": len(unet), "scheduler": t.get("scheduler", 0.0),
            "vae_decode": t.get("vae_decode", 0.0), "total": t["total"]}


def ours_computation(cfg: BenchConfig, pipe) -> dict:
    """What ours runs for ``cfg``, from the runtime's own request and scheduler: timesteps and the UNet batch."""
    from edgediff.schedulers import make_scheduler

    req = pipe.request(cfg.prompt, **cfg.call_kwargs())
    sched = make_scheduler(req.scheduler, pipe.scheduler_config)
    pipe.set_timesteps(sched, req.steps, req.height, req.width)  # FLUX's mu and sigmas as the pipeline passes them
    # T5's token count (SD3/FLUX): the reference must encode as many (FluxPipeline's default 512 is not schnell's 256)
    length = req.extra.get("max_sequence_length", getattr(pipe.conditioner, "default_length", None))
    return {"scheduler": req.scheduler, "height": req.height, "width": req.width,
            "timesteps": [float(t) for t in sched.timesteps], "unet_batch": [req.denoiser_batch],
            **({"max_sequence_length": int(length)} if length is not None else {})}


def check_like_for_like(ours: dict, theirs: dict, ours_calls: int) -> None:
    """Ratios of two different computations would be wrong, not merely noisy: refuse them."""
    same = (len(ours["timesteps"]) == len(theirs["timesteps"])
            and np.allclose(ours["timesteps"], theirs["timesteps"], atol=1e-3)
            and ours["unet_batch"] == theirs["unet_batch"] and ours_calls == theirs["unet_calls"])
    if not same:
        raise BackendError(
            f"--compare diffusers did not run the same computation: ours {ours_calls} UNet calls of batch "
            f"{ours['unet_batch']} at timesteps {_short(ours['timesteps'])}, diffusers ({theirs['scheduler_class']}, "
            f"spacing {theirs.get('timestep_spacing')}) {theirs['unet_calls']} of batch {theirs['unet_batch']} at "
            f"{_short(theirs['timesteps'])}; the ratios would compare different work")


def compare(cfg: BenchConfig, pipe, source: Path, *, order: str = "alternate",
            release: Callable[[], None] | None = None) -> dict:
    """``cfg.runs`` generations each side after one warm-up each; ratios ours/theirs of the means. With
    ``order="sequential"`` ours run first and ``release()`` closes our pipeline before diffusers loads."""
    bundle = pipe.bundle
    what = ours_computation(cfg, pipe)
    h, w = what["height"], what["width"]
    start = lambda: DiffusersWorker(source, reference_pipeline(bundle.manifest.family),  # noqa: E731
                                    bundle.config(layout.SCHEDULER_CONFIG))
    theirs_run = lambda wk, seed: wk.run(cfg, height=h, width=w, seed=seed, scheduler=what["scheduler"],  # noqa: E731
                                         max_sequence_length=what.get("max_sequence_length"))
    seeds = [cfg.seed + r for r in range(cfg.runs + 1)]  # seeds[0]: the warm-up of both
    ours_runs, theirs_runs = [], []
    worker = None
    try:
        # Our process's peak RSS over its generations (while the worker runs, ours only waits)
        with PeakRss() as ours_mem:
            if order == "alternate":
                worker = start()
                for seed in seeds:
                    ours_runs.append(ours_run(cfg, pipe, seed))
                    theirs_runs.append(theirs_run(worker, seed))
            else:
                ours_runs = [ours_run(cfg, pipe, seed) for seed in seeds]
        if order == "sequential":
            if release is not None:
                release()
            worker = start()
            theirs_runs = [theirs_run(worker, seed) for seed in seeds]
    finally:
        if worker is not None:
            worker.close()
    check_like_for_like(what, theirs_runs[-1], ours_runs[-1]["unet_calls"])
    ours_runs, theirs_runs = ours_runs[1:], theirs_runs[1:]
    mean = lambda rows, k: sum(x.get(k, 0.0) for x in rows) / len(rows)  # noqa: E731
    out = {"reference": dict(worker.versions, source=str(source)), "order": order,
           "computation": {k: what[k] for k in ("scheduler", "timesteps", "unet_batch", "max_sequence_length")
                           if k in what}
           | {"diffusers_scheduler": theirs_runs[-1]["scheduler_class"],
              "timestep_spacing": theirs_runs[-1].get("timestep_spacing")},
           "ours": {}, "theirs": {}, "ratio": {}}
    for k in TIMED:
        a, b = mean(ours_runs, k), mean(theirs_runs, k)
        out["ours"][k], out["theirs"][k] = a, b
        out["ratio"][k] = a / b if b else None
    a, b = ours_mem.peak, max((x.get("peak_rss") or 0) for x in theirs_runs) or None
    out["peak_rss_bytes"] = {"ours": a, "theirs": b, "ratio": a / b if a and b else None}
    return out


def _short(values: list[float]) -> str:
    return str([round(v, 3) for v in values[:6]])[:-1] + (", ...]" if len(values) > 6 else "]")
