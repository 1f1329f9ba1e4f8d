"""One generation in flight, between denoising steps: the state a step-level scheduler (the server's continuous
batching, runtime/batching.py) needs to interleave many requests, and the single-call loop steps through alone.

A job owns its request's scheduler, conditioning, latents and noise stream, so stepping it in a batch with other
jobs or alone performs the same arithmetic on the same arrays: the denoiser sees a batch that is the concatenation
of each job's own (2N or N) rows, and each job reads back only its rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .conditioning import Conditioning
from .errors import Cancelled, NonFiniteError
from .request import GenerationRequest
from .timing import Span, Stopwatch

StepCallback = Callable[[int, int, float, np.ndarray], None]  # (step done, total steps, timestep, latents)
DENOISER = "unet"  # the bundle component a step runs by default (Bundle.denoiser: "transformer" for SD3/FLUX)
STEP_SPAN = "unet"  # the timing span of a call to the job's denoiser, whatever its component: what the bench reads


class StepExtension(Protocol):
    """A feature that changes what a denoising step computes without changing the loop: ControlNet residuals,
    an inpainting UNet's extra channels or the latent blend, DeepCache's shallow graph, a CFG cutoff. Each hook is
    optional (a plain object with only some of these methods works); they run in the order of ``job.extensions``."""

    def graph(self, job: "DenoiseJob", graph: str) -> str:
        """The bundle component this step runs (``job.denoiser`` by default)."""

    def feeds(self, job: "DenoiseJob", feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's denoiser inputs, after the job's own (more inputs, other channels)."""

    def after_step(self, job: "DenoiseJob", x: np.ndarray) -> np.ndarray:
        """The latents after the scheduler's update (e.g. keep the unmasked region)."""

    def outputs(self, job: "DenoiseJob", outputs: dict[str, np.ndarray]) -> None:
        """A graph with several outputs: all of them by name, this job's rows (DeepCache's cached feature)."""


@dataclass
class DenoiseJob:
    request: GenerationRequest
    scheduler: object  # a Scheduler (runtime/schedulers/protocol.py), set_timesteps already called
    cond: Conditioning
    x: np.ndarray  # (N, C, h, w) float32 latents after the last step taken
    end: int  # one past the last step index to run
    watch: Stopwatch
    start_time: float  # perf_counter at the start of the request, for the "total" span
    callback: StepCallback | None = None
    cancel: Callable[[], bool] | None = None
    extensions: tuple = ()  # StepExtension objects, applied in order at each step
    denoiser: str = DENOISER  # the bundle's denoiser component (Bundle.denoiser), the graph a step runs by default
    step: int = field(init=False)  # the next step index
    error: BaseException | None = field(default=None, init=False)  # set by a step-level scheduler when a step failed
    _step_start: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.step = self.scheduler.begin_index

    @property
    def done(self) -> bool:
        return self.step >= self.end

    @property
    def batch(self) -> int:
        """Rows this job contributes to a denoiser call: 2N with classifier-free guidance, else N."""
        return self.x.shape[0] * (2 if self.cond.guided else 1)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"generation cancelled before step {self.step + 1} of {self.end}")

    def graph(self) -> str:
        """The bundle component the next step runs."""
        name = self.denoiser
        for ext in self.extensions:
            if hasattr(ext, "graph"):
                name = ext.graph(self, name)
        return name

    def span_name(self, graph: str) -> str:
        """The timing span of a call to ``graph``: STEP_SPAN for the denoiser itself, so a UNet's and a
        transformer's steps are read alike; another graph an extension picks keeps its own name."""
        return STEP_SPAN if graph == self.denoiser else graph

    def unet_feeds(self) -> dict[str, np.ndarray]:
        """The denoiser's inputs for the next step, (batch, ...) each."""
        i, sched = self.step, self.scheduler
        self._step_start = time.perf_counter()
        x_in = np.concatenate([self.x, self.x]) if self.cond.guided else self.x  # (2N or N, C, h, w)
        with self.watch.span("scheduler", i):
            x_in = sched.scale_model_input(x_in, i)
        t = sched.timesteps[i]
        feeds = {"sample": x_in, "timestep": np.full((x_in.shape[0],), t, np.float32),
                 "encoder_hidden_states": self.cond.encoder_hidden_states, **self.cond.extra}
        for ext in self.extensions:
            if hasattr(ext, "feeds"):
                feeds = ext.feeds(self, feeds)
        return feeds

    def advance(self, eps: np.ndarray | dict[str, np.ndarray]) -> None:
        """Take the step with the denoiser's output for this job's rows ((batch, C, h, w) float32, finite). A graph
        with several outputs gives them all by name, the noise prediction first; the extensions' ``outputs`` hooks
        see them (runtime/deepcache.py caches its feature)."""
        if isinstance(eps, dict):
            for ext in self.extensions:
                if hasattr(ext, "outputs"):
                    ext.outputs(self, eps)
            eps = next(iter(eps.values()))
        i, sched, g = self.step, self.scheduler, np.float32(self.request.guidance_scale)
        with self.watch.span("scheduler", i):
            if self.cond.guided:  # classifier-free guidance (Ho & Salimans 2022): e_u + g (e_c - e_u)
                eps_u, eps_c = np.split(eps, 2)
                eps = eps_u + g * (eps_c - eps_u)
            self.x = sched.step(eps, i, self.x, self.request.noise)
            for ext in self.extensions:
                if hasattr(ext, "after_step"):
                    self.x = ext.after_step(self, self.x)
        if not np.isfinite(self.x).all():  # the denoiser's output was finite: the update overflowed
            raise NonFiniteError(f"the {sched.name} scheduler produced NaN/Inf at step {i + 1} of {self.end} "
                                 "from finite model outputs; try another scheduler or fewer steps")
        self.watch.spans.append(Span("step", self._step_start, time.perf_counter(), i))
        self.step += 1
        if self.callback is not None:
            self.callback(i + 1, self.end, float(sched.timesteps[i]), self.x)
