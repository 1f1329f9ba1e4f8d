"""``--compare diffusers``: ours in this process, diffusers in a worker process, alternating run by run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from edgediff.errors import InputError, MissingDependency

from .runner import BenchConfig


def check_reference(source: Path) -> None:
    """Refuse a reference the worker could not run, before anything is measured."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        raise MissingDependency("--compare diffusers needs torch and diffusers (in their own process): "
                                "pip install torch==2.13.0 'edgediff[export]'")
    if not (Path(source) / "model_index.json").is_file():
        raise InputError(f"--reference {source} is not a diffusers pipeline folder (no model_index.json)")


class DiffusersWorker:
    def __init__(self, source: Path):
        check_reference(source)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgediff.bench.diffusers_worker", str(source)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        hello = self.proc.stdout.readline()
        if not hello:
            err = (self.proc.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise InputError(f"the diffusers reference process failed to start: {err}")
        self.versions = json.loads(hello)

    def run(self, cfg: BenchConfig, height: int, width: int, seed: int) -> dict:
        req = dict(prompt=cfg.prompt, steps=cfg.steps, guidance=cfg.guidance, height=height, width=width,
                   batch=cfg.batch, seed=seed, scheduler=cfg.scheduler)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = (self.proc.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise InputError(f"the diffusers reference run failed: {err}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compare(cfg: BenchConfig, pipe, source: Path) -> dict:
    """Alternate ours and theirs ``cfg.runs`` times after one warm-up each; ratios ours/theirs of the means."""
    m = pipe.bundle.manifest
    h, w = cfg.height or m.default_height, cfg.width or m.default_width
    worker = DiffusersWorker(source)
    try:
        ours_runs, theirs_runs = [], []
        for r in range(cfg.runs + 1):
            seed = cfg.seed + r
            res = pipe(cfg.prompt, **{**cfg.call_kwargs(), "seed": seed})
            unet = [s.seconds for s in res.spans if s.name == "unet"]
            ours = dict(res.timings, unet_per_call=sum(unet) / len(unet))
            theirs = worker.run(cfg, h, w, seed)
            if r:  # r = 0 is the warm-up of both
                ours_runs.append(ours)
                theirs_runs.append(theirs)
    finally:
        worker.close()
    keys = ("text_encoder", "unet_per_call", "scheduler", "vae_decode", "total")
    mean = lambda rows, k: sum(x.get(k, 0.0) for x in rows) / len(rows)  # noqa: E731
    out = {"reference": worker.versions, "ours": {}, "theirs": {}, "ratio": {}}
    for k in keys:
        a, b = mean(ours_runs, k), mean(theirs_runs, k)
        out["ours"][k], out["theirs"][k] = a, b
        out["ratio"][k] = a / b if b else None
    return out
