"""Step-level batching (the iteration-level scheduling of LLM servers, applied to diffusion): one denoiser call
for every in-flight job whose inputs can share a batch, each job keeping its own scheduler, guidance, step count,
seed and noise stream. Jobs join and leave between steps; the caller (a server's scheduler loop) decides which.

The denoiser computes each batch row independently of the others (convolutions, group norm and attention are all
per sample), so a job's rows come out of a shared call as they would alone: ``tests/runtime/test_batching.py``
checks the images are identical to the bit on ONNX Runtime CPU.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable, Sequence

import numpy as np

from .job import DenoiseJob
from .timing import Span

# (graph, feeds (B, ...)) -> output (B, C, h, w) float32; graph: the bundle component to run ("unet", ...). A graph
# with several outputs returns them all, {name: (B, ...)}, the noise prediction first (Pipeline.run_denoiser).
RunDenoiser = Callable[[str, dict[str, np.ndarray]], np.ndarray]


def batch_key(feeds: dict[str, np.ndarray], graph: str = "unet") -> Hashable:
    """Jobs that run the same graph with feeds that agree on every name, per-row shape and dtype can be
    concatenated along the batch."""
    return graph, tuple(sorted((name, a.shape[1:], a.dtype.str) for name, a in feeds.items()))


def step_together(jobs: Sequence[DenoiseJob], run: RunDenoiser, *, max_batch: int | None = None) -> list[DenoiseJob]:
    """Advance every job that is not done by one step, sharing denoiser calls where their inputs allow (at most
    ``max_batch`` rows a call: a static-batch engine or a memory bound). Returns the jobs that raised nothing; a
    job whose step raised has the exception stored in ``job.error`` and is not stepped again."""
    pending = [j for j in jobs if not j.done and j.error is None]
    staged: dict[Hashable, list[tuple[DenoiseJob, dict[str, np.ndarray]]]] = {}
    for job in pending:
        try:
            job.check_cancel()
            graph = job.graph()
            feeds = job.unet_feeds()
        except Exception as exc:  # this job's own failure (cancelled, bad state): it leaves, the others go on
            job.error = exc
            continue
        staged.setdefault(batch_key(feeds, graph), []).append((job, feeds))
    for (graph, _), group in staged.items():
        for chunk in _chunks(group, max_batch):
            _run_chunk(graph, chunk, run)
    return [j for j in pending if j.error is None]


def _chunks(group, max_batch):
    chunk, rows = [], 0
    for job, feeds in group:
        if chunk and max_batch is not None and rows + job.batch > max_batch:
            yield chunk
            chunk, rows = [], 0
        chunk.append((job, feeds))
        rows += job.batch
    if chunk:
        yield chunk


def _run_chunk(graph: str, chunk, run: RunDenoiser) -> None:
    names = list(chunk[0][1])
    feeds = {n: np.concatenate([f[n] for _, f in chunk]) for n in names} if len(chunk) > 1 else chunk[0][1]
    t0 = time.perf_counter()
    try:
        eps = run(graph, feeds)  # (sum of batches, C, h, w) float32
    except Exception as exc:  # the shared call failed: every job in it fails with the same cause
        for job, _ in chunk:
            job.error = exc
        return
    t1 = time.perf_counter()
    offset = 0
    for job, _ in chunk:
        job.watch.spans.append(Span(job.span_name(graph), t0, t1, job.step))
        if isinstance(eps, dict):  # a graph with several outputs (runtime/deepcache.py): each one's rows
            rows = {name: a[offset:offset + job.batch] for name, a in eps.items()}
        else:
            rows = eps[offset:offset + job.batch]
        offset += job.batch
        try:
            job.advance(rows)
        except Exception as exc:
            job.error = exc
