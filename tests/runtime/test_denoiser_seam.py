"""The denoiser seam (runtime/job.py, Bundle.denoiser): the graph a step runs comes from the bundle (a UNet, or SD3 /
FLUX's transformer), not from a type switch in the loop, and the denoiser's timing span keeps the name the bench
reads whatever its component."""
from __future__ import annotations

import dataclasses

import pytest

from edgediff import Pipeline
from edgediff.batching import step_together
from edgediff.builtin_model import default_bundle
from edgediff.job import STEP_SPAN


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(default_bundle()) as p:
        yield p


class _Shallow:
    """An extension that routes every step to another graph (as DeepCache's shallow UNet would)."""

    def graph(self, job, graph):
        return "shallow"


def test_a_unet_bundle_steps_its_unet_under_the_unet_span(pipe):
    assert pipe.bundle.denoiser == "unet"
    job = pipe.start(pipe.request("a red circle", seed=0, num_inference_steps=2))
    assert job.denoiser == "unet" and job.graph() == "unet"
    result = pipe.generate(pipe.request("a red circle", seed=0, num_inference_steps=2))
    assert [s.name for s in result.spans].count(STEP_SPAN) == 2 and "unet" in result.timings


def test_the_job_runs_the_bundles_denoiser_and_names_its_span_alike(pipe):
    job = pipe.start(pipe.request("a red circle", seed=0, num_inference_steps=2))
    moved = dataclasses.replace(job, denoiser="transformer")  # what Pipeline.start sets for an SD3/FLUX bundle
    assert moved.graph() == "transformer"
    assert moved.span_name("transformer") == STEP_SPAN == "unet"  # bench/runner.py reads the "unet" span
    assert moved.span_name("shallow") == "shallow"  # another graph an extension picks keeps its own name
    routed = dataclasses.replace(job, denoiser="transformer", extensions=(_Shallow(),))
    assert routed.graph() == "shallow"


def test_batched_steps_record_the_denoiser_span(pipe):
    jobs = [pipe.start(pipe.request("a blue square", seed=k, num_inference_steps=2)) for k in range(2)]
    seen = []

    def run(graph, feeds):
        seen.append(graph)
        return pipe.run_denoiser(graph, feeds)

    while any(not j.done for j in jobs):
        step_together(jobs, run)
    assert seen == ["unet", "unet"]
    assert all([s.name for s in j.watch.spans].count(STEP_SPAN) == 2 for j in jobs)
