"""One scheduler thread per loaded model: step-level continuous batching over a Pipeline.

The thread owns the model. Requests arrive validated (``Pipeline.request``) and wait in a bounded queue; each
iteration the thread
    1. drops waiting requests that were cancelled or ran out of time,
    2. starts newly admitted requests, up to ``max_active`` in flight (text encoding, initial latents:
       ``Pipeline.start``),
    3. advances every in-flight request by one denoising step, in as few denoiser calls as their inputs allow
       (``edgediff.batching.step_together``: requests join and leave between steps),
    4. finishes the requests that took their last step (VAE decode, one call for all that share a shape:
       ``Pipeline.finish_many``) and resolves their futures.
Each request keeps its own scheduler, guidance, step count and noise stream, so its images are the ones
``Pipeline`` gives alone (tests/serve/test_parity.py). With ``batching=False`` one request is in flight at a time:
the baseline the batching figure is measured against.

Nothing here knows about HTTP: the app turns ``QueueFull``/``ShuttingDown`` and a ticket's ``stop_reason`` into
responses, and calls ``Ticket.cancel`` when a client leaves or its time runs out.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from edgediff.batching import step_together
from edgediff.errors import Cancelled
from edgediff.job import DenoiseJob
from edgediff.request import GenerationRequest

from .metrics import ServerMetrics

log = logging.getLogger("edgediff.serve")

Progress = Callable[[int, int], None]  # (steps done, steps to run) after each step, on the engine thread


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(frozen=True)
class EngineConfig:
    max_active: int = 8  # requests denoised together (1 when batching is off)
    max_queue: int = 32  # requests waiting beyond those (admitted in all: slots + max_queue); one more gets 429
    max_batch: int | None = None  # denoiser rows per call (a static-batch engine or a memory bound); None: no cap
    batching: bool = True  # False: one request in flight at a time (the comparison baseline)
    warmup: bool = True  # run one small request before reporting ready (first-call allocations, thread pools)

    @property
    def slots(self) -> int:
        return self.max_active if self.batching else 1


@dataclass
class Ticket:
    """One admitted request and how its caller watches it: a future for the result, a cancel switch, a deadline."""

    request: GenerationRequest
    deadline: float | None  # time.monotonic() past which the request is abandoned
    progress: Progress | None = None
    timeout: float | None = None  # seconds the deadline was set from, for the error message
    future: Future = field(default_factory=Future)
    admitted_at: float = field(default_factory=time.perf_counter)
    stop_reason: str | None = None  # "disconnect" | "timeout" | "shutdown" once stopped
    _stop: threading.Event = field(default_factory=threading.Event)

    def cancel(self, reason: str) -> None:
        """Stop this request before its next step (any thread)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def should_stop(self) -> bool:
        """The job's ``cancel`` callable: true once cancelled or past the deadline."""
        if not self._stop.is_set() and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel("timeout")
        return self._stop.is_set()

    def _resolve(self, result=None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class Engine:
    def __init__(self, name: str, pipe, config: EngineConfig = EngineConfig(), metrics: ServerMetrics | None = None):
        self.name, self.pipe, self.config = name, pipe, config
        self.metrics = metrics or ServerMetrics()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._active: list[tuple[Ticket, DenoiseJob]] = []
        self._held = 0  # admitted and not yet resolved: waiting, starting, in flight or finishing
        self._accepting = True
        self._stop_at: float | None = None  # monotonic deadline after which everything left is cancelled
        self._recent: collections.deque[float] = collections.deque(maxlen=32)  # seconds per finished request
        self.ready = threading.Event()
        self.failure: BaseException | None = None  # warm-up or loop failure: the engine serves nothing
        self._thread = threading.Thread(target=self._main, name=f"edgediff-engine-{name}", daemon=True)
        self.metrics.queue_depth.track(lambda: len(self._waiting), model=name)
        self.metrics.inflight.track(lambda: len(self._active), model=name)

    # -- the caller's side (any thread) --------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, request: GenerationRequest, *, timeout: float | None = None,
               progress: Progress | None = None) -> Ticket:
        """Admit a validated request, or raise QueueFull (with a Retry-After estimate) / ShuttingDown."""
        with self._cv:
            if not self._accepting or not self.alive:
                raise ShuttingDown()
            if self._held >= self.config.slots + self.config.max_queue:
                raise QueueFull(self._retry_after())  # a burst is admitted up to the slots plus the queue
            ticket = Ticket(request, None if timeout is None else time.monotonic() + timeout, progress, timeout)
            self._waiting.append(ticket)
            self._held += 1
            self._cv.notify()
        return ticket

    def shutdown(self, grace: float) -> None:
        """Stop admitting; finish what was admitted within ``grace`` seconds, then cancel the rest (their callers
        get a clean "shutting down" error). Returns at once; ``join`` waits for the thread."""
        with self._cv:
            self._accepting = False
            self._stop_at = time.monotonic() + max(0.0, grace)
            self._cv.notify()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, drained at the recent pace (at least 1)."""
        per = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
        rounds = (len(self._waiting) + len(self._active)) / max(1, self.config.slots)
        return max(1, int(per * rounds + 0.999))

    # -- the engine thread ------------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.config.warmup:
                self._warm_up()
            self.ready.set()
            self._loop()
        except BaseException as exc:  # a bug or a dead backend: fail every caller instead of hanging them
            log.exception("engine %s stopped", self.name)
            self.failure = exc
            self.ready.set()
            with self._cv:
                self._accepting = False
                tickets = list(self._waiting) + [t for t, _ in self._active]
                self._waiting.clear()
                self._active.clear()
            for t in tickets:
                self._done(t, error=exc)

    def _warm_up(self) -> None:
        """One two-step guided request at the model's default size: the first call's allocations happen here,
        not in a client's latency."""
        pipe = self.pipe
        # guided where guidance is classifier-free; else the bundle's own (FLUX.1-schnell refuses any guidance_scale)
        cfg = getattr(pipe.conditioner, "classifier_free_guidance", True)
        req = pipe.request("warm-up", num_inference_steps=2, seed=0,
                           guidance_scale=max(2.0, pipe.default_guidance) if cfg else None)
        job = pipe.start(req)
        while not job.done:
            step_together([job], self._run)
            if job.error is not None:
                raise job.error
        pipe.finish(job)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._active and self._stop_at is None:
                    self._cv.wait()
                if self._stop_at is not None and time.monotonic() >= self._stop_at:
                    for t in list(self._waiting) + [t for t, _ in self._active]:
                        t.cancel("shutdown")
                if self._stop_at is not None and not self._waiting and not self._active:
                    return
                dropped = [t for t in self._waiting if t.should_stop()]
                for t in dropped:
                    self._waiting.remove(t)
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.config.slots:
                    admitted.append(self._waiting.popleft())
            for t in dropped:
                self._done(t, error=Cancelled(f"request stopped while queued ({t.stop_reason})"))
            for t in admitted:
                self._admit(t)
            if self._active:
                self._step()
            elif self._stop_at is not None:
                with self._cv:
                    self._cv.wait(0.05)  # draining with nothing in flight: re-check the deadline shortly

    def _admit(self, t: Ticket) -> None:
        now = time.perf_counter()
        self.metrics.stage_seconds.observe(now - t.admitted_at, model=self.name, stage="queue")
        if t.should_stop():
            self._done(t, error=Cancelled(f"request stopped while queued ({t.stop_reason})"))
            return
        callback = None
        if t.progress is not None:
            progress = t.progress
            callback = lambda i, total, _t, _x: progress(i, total)  # noqa: E731 - the job's StepCallback shape
        try:
            job = self.pipe.start(t.request, callback=callback, cancel=t.should_stop)
        except Exception as exc:  # this request's own failure (e.g. img2img strength too low): it alone fails
            self._done(t, error=exc)
            return
        self.metrics.stage_seconds.observe(time.perf_counter() - now, model=self.name, stage="start")
        with self._cv:
            self._active.append((t, job))

    def _step(self) -> None:
        step_together([j for _, j in self._active], self._run, max_batch=self.config.max_batch)
        finished = [(t, j) for t, j in self._active if j.done or j.error is not None]
        if not finished:
            return
        with self._cv:
            self._active = [(t, j) for t, j in self._active if not (j.done or j.error is not None)]
        for t, job in finished:
            if job.error is not None:
                self._done(t, error=job.error)
        ready = [(t, j) for t, j in finished if j.error is None]
        if not ready:
            return
        t0 = time.perf_counter()
        results = self.pipe.finish_many([j for _, j in ready])  # one decoder call per compatible group
        done = time.perf_counter()
        self.metrics.stage_seconds.observe(done - t0, model=self.name, stage="finish")
        for (t, _), result in zip(ready, results):
            if isinstance(result, BaseException):
                self._done(t, error=result)
                continue
            self._recent.append(done - t.admitted_at)
            self._done(t, result)

    def _done(self, t: Ticket, result=None, error: BaseException | None = None) -> None:
        with self._cv:
            self._held -= 1
        t._resolve(result, error)

    def _run(self, graph: str, feeds):
        """The step-level scheduler's denoiser call (``step_together``'s ``run``), timed for /metrics."""
        t0 = time.perf_counter()
        eps = self.pipe.run_denoiser(graph, feeds)  # (rows, C, h, w) float32, checked finite
        self.metrics.stage_seconds.observe(time.perf_counter() - t0, model=self.name, stage=graph)
        self.metrics.unet_rows.observe(feeds["sample"].shape[0], model=self.name)
        return eps
