"""Same request through the server and through ``Pipeline`` alone -> the same image, to the bit (ONNX Runtime CPU,
built-in model, fixed seeds), also when the server denoised it in shared calls with seven other different requests
(continuous batching: edgediff.batching.step_together)."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import threading

import httpx
import numpy as np
from PIL import Image

from conftest import MODEL, serving
from edgediff.outputs import png_bytes
from edgediff.serve.engine import EngineConfig

# eight different requests: prompts, seeds, steps, guidance, schedulers, negative prompts, sizes, images
REQUESTS = [
    dict(prompt="a small red circle in the top left corner", seed=0, num_inference_steps=6),
    dict(prompt="a large blue square in the center", seed=1, num_inference_steps=4, guidance_scale=3.0),
    dict(prompt="a green triangle at the bottom", seed=2, num_inference_steps=5, scheduler="euler_a"),
    dict(prompt="a yellow cross on the right", seed=3, num_inference_steps=3, guidance_scale=1.0),
    dict(prompt="a small purple circle", seed=4, num_inference_steps=6, scheduler="dpmpp_2m", n=2),
    dict(prompt="a red square", seed=5, num_inference_steps=2, negative_prompt="blue"),
    dict(prompt="an orange square in the top right corner", seed=6, num_inference_steps=7, scheduler="ddim"),
    dict(prompt="a large green circle", seed=7, num_inference_steps=4, scheduler="unipc", size="48x64"),
]


def _alone(pipe, kw):
    kw = dict(kw)
    n = kw.pop("n", 1)
    size = kw.pop("size", None)
    if size:
        w, h = map(int, size.split("x"))
        kw.update(width=w, height=h)
    return pipe(num_images_per_prompt=n, **kw)


def _pixels(png: bytes) -> bytes:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).tobytes()


def _post(url, kw):
    r = httpx.post(url + "/v1/images/generations", json=dict(kw, model=MODEL), timeout=120)
    assert r.status_code == 200, r.text
    return [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]


def test_one_request_gives_the_pipelines_bytes(url, pipe):
    kw = REQUESTS[0]
    served = _post(url, kw)
    alone = _alone(pipe, kw)
    assert [_pixels(p) for p in served] == [np.asarray(im).tobytes() for im in alone.images]
    # the file itself: the same PNG `edgediff generate` would write for it (parameters chunk included)
    expected = png_bytes(alone.images[0], alone.image_parameters(0, prompt=kw["prompt"], rng="numpy", backend="cpu",
                                                                 model=MODEL))
    assert served[0] == expected


def test_batched_with_seven_other_requests_gives_the_same_bytes(pipe):
    alone = [[np.asarray(im).tobytes() for im in _alone(pipe, kw).images] for kw in REQUESTS]
    gate = threading.Barrier(len(REQUESTS))

    def send(url, kw):
        gate.wait(10)  # all eight arrive together and are denoised in shared calls
        return [_pixels(p) for p in _post(url, kw)]

    with serving(pipe, config=EngineConfig(warmup=False, max_active=8)) as (url, state):
        engine = state.engines[MODEL]
        with cf.ThreadPoolExecutor(len(REQUESTS)) as pool:
            served = list(pool.map(lambda kw: send(url, kw), REQUESTS))
        rows = state.metrics.unet_rows
        calls = rows.count(model=MODEL)
    assert served == alone
    total_steps = sum(kw["num_inference_steps"] for kw in REQUESTS)
    assert calls < total_steps, f"{calls} denoiser calls for {total_steps} request-steps: nothing was shared"
    assert engine.config.batching
