"""Step-level batching (runtime/batching.py, runtime/job.py): requests stepped together in shared denoiser calls,
joining and leaving between steps, give the same images as each request run alone — to the bit on CPU."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.batching import batch_key, step_together
from edgediff.builtin_model import default_bundle
from edgediff.errors import Cancelled

REQUESTS = [  # eight different requests: prompts, seeds, step counts, guidance, schedulers, images per prompt
    dict(prompt="a small red circle in the top left corner", seed=0, num_inference_steps=6),
    dict(prompt="a large blue square in the center", seed=1, num_inference_steps=4, guidance_scale=3.0),
    dict(prompt="a green triangle at the bottom", seed=2, num_inference_steps=5, scheduler="euler_a"),
    dict(prompt="a yellow cross on the right", seed=3, num_inference_steps=3, guidance_scale=1.0),
    dict(prompt="a small purple circle", seed=4, num_inference_steps=6, scheduler="dpmpp_2m", num_images_per_prompt=2),
    dict(prompt=["a red square", "a blue circle"], seed=5, num_inference_steps=2),
    dict(prompt="an orange square in the top right corner", seed=6, num_inference_steps=7, scheduler="ddim"),
    dict(prompt="a large green circle", seed=7, num_inference_steps=4, scheduler="unipc", guidance_scale=6.0),
]


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(default_bundle()) as p:
        yield p


def _pixels(result) -> list[bytes]:
    return [np.asarray(im).tobytes() for im in result.images]


def test_batched_requests_equal_each_request_alone(pipe):
    alone = [_pixels(pipe(**kw)) for kw in REQUESTS]
    calls = []

    def run(graph, feeds):
        calls.append(feeds["sample"].shape[0])
        return pipe.run_denoiser(graph, feeds)

    jobs = [pipe.start(pipe.request(**kw)) for kw in REQUESTS[:5]]
    late = list(REQUESTS[5:])
    while any(not j.done for j in jobs) or late:
        step_together(jobs, run)
        if late:  # requests join between steps
            jobs.append(pipe.start(pipe.request(**late.pop(0))))
    together = [_pixels(pipe.finish(j)) for j in jobs]
    assert together == alone
    assert max(calls) > 8 and len(calls) < sum(kw["num_inference_steps"] for kw in REQUESTS)  # calls were shared


def test_max_batch_splits_calls_and_keeps_results(pipe):
    kws = REQUESTS[:3]
    alone = [_pixels(pipe(**kw)) for kw in kws]
    sizes = []

    def run(graph, feeds):
        sizes.append(feeds["sample"].shape[0])
        return pipe.run_denoiser(graph, feeds)

    jobs = [pipe.start(pipe.request(**kw)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, run, max_batch=2)
    assert max(sizes) <= 2
    assert [_pixels(pipe.finish(j)) for j in jobs] == alone


def test_a_failing_job_leaves_and_the_others_finish(pipe):
    flag = {"stop": False}
    good = pipe.start(pipe.request(**REQUESTS[0]))
    bad = pipe.start(pipe.request(**REQUESTS[1]), cancel=lambda: flag["stop"])
    step_together([good, bad], pipe.run_denoiser)
    flag["stop"] = True
    while not good.done:
        step_together([good, bad], pipe.run_denoiser)
    assert isinstance(bad.error, Cancelled) and good.error is None
    assert _pixels(pipe.finish(good)) == _pixels(pipe(**REQUESTS[0]))


def test_batch_key_separates_shapes():
    a = {"sample": np.zeros((2, 4, 8, 8), np.float32)}
    b = {"sample": np.zeros((1, 4, 8, 8), np.float32)}
    c = {"sample": np.zeros((1, 4, 8, 16), np.float32)}
    assert batch_key(a) == batch_key(b) != batch_key(c)
    assert batch_key(a, "unet") != batch_key(a, "unet_shallow")  # another graph never shares a call


class _KeepChannelZero:
    """A step extension (runtime/job.py): clears latent channel 0 after every step and counts its hooks."""

    def __init__(self):
        self.calls = {"graph": 0, "feeds": 0, "after_step": 0}

    def graph(self, job, graph):
        self.calls["graph"] += 1
        return graph

    def feeds(self, job, feeds):
        self.calls["feeds"] += 1
        return feeds

    def after_step(self, job, x):
        self.calls["after_step"] += 1
        x = x.copy()
        x[:, 0] = 0.0
        return x


def test_step_extensions_apply_alone_and_batched(pipe):
    kw = dict(REQUESTS[0], output_type="latent")
    ext = _KeepChannelZero()
    alone = pipe.generate(pipe.request(**kw), extensions=[ext])
    assert ext.calls == {"graph": 6, "feeds": 6, "after_step": 6}
    assert not alone.latents[:, 0].any() and alone.latents[:, 1:].any()
    jobs = [pipe.start(pipe.request(**kw), extensions=[_KeepChannelZero()]), pipe.start(pipe.request(**REQUESTS[1]))]
    while any(not j.done for j in jobs):
        step_together(jobs, pipe.run_denoiser)
    assert np.array_equal(pipe.finish(jobs[0]).latents, alone.latents)
    assert _pixels(pipe.finish(jobs[1])) == _pixels(pipe(**REQUESTS[1]))  # the other job untouched


def test_finish_many_decodes_together_and_equals_finish(pipe):
    kws = [REQUESTS[0], REQUESTS[4], dict(REQUESTS[1], output_type="latent"), dict(REQUESTS[2], height=128, width=64)]
    alone = [pipe(**kw) for kw in kws]
    jobs = [pipe.start(pipe.request(**kw)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, pipe.run_denoiser)
    calls = []
    real = pipe.components.get("vae_decoder").run
    pipe.components.get("vae_decoder").run = lambda feeds: calls.append(feeds["latent_sample"].shape) or real(feeds)
    try:
        results = pipe.finish_many(jobs)
    finally:
        pipe.components.get("vae_decoder").run = real
    assert [_pixels(r) for r in results[:2] + results[3:]] == [_pixels(a) for a in alone[:2] + alone[3:]]
    assert np.array_equal(results[2].latents, alone[2].latents)
    assert sorted(c[0] for c in calls) == [1, 3]  # the two 64x64 requests (1 + 2 images) shared one call
