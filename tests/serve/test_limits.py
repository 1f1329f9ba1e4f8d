"""Admission and its limits: the API key, body size, the bounded queue (429 + Retry-After, nothing lost or
duplicated at twice the bound), the per-request timeout, cancellation when the client disconnects, and an engine
shutdown that answers in-flight requests with a clean 503. Each test runs its own small server over the built-in
model; every loop is bounded."""
from __future__ import annotations

import concurrent.futures as cf
import threading

import httpx
import pytest

from conftest import MODEL, serving, wait_until
from edgediff.serve.engine import EngineConfig
from edgediff.serve.state import Limits

openai = pytest.importorskip("openai")
GEN = "/v1/images/generations"


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_api_key(pipe):
    with serving(pipe, api_key="sekret") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(prompt="x", extra_body={"num_inference_steps": 1})
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert good.images.generate(prompt="x", extra_body={"num_inference_steps": 1}).data[0].b64_json
        bare = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=30)
        assert _error(bare, 401)["code"] == "invalid_api_key" and bare.headers["www-authenticate"] == "Bearer"
        lower = httpx.get(url + "/v1/models", headers={"authorization": "bearer sekret"}, timeout=30)
        assert lower.status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers need no key
            assert httpx.get(url + open_path, timeout=30).status_code == 200, open_path


def test_body_size_limit_declared_and_streamed(pipe):
    with serving(pipe, limits=Limits(max_body_bytes=2000)) as (url, state):
        big = {"prompt": "x" * 3000}
        assert _error(httpx.post(url + GEN, json=big, timeout=30), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        r = httpx.post(url + GEN, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        assert _error(r, 413)["code"] == "request_too_large"
        upload = httpx.post(url + "/v1/images/edits", files={"image": ("a.png", b"\0" * 5000, "image/png")},
                            data={"prompt": "x"}, timeout=30)
        assert _error(upload, 413)["code"] == "request_too_large"
        assert state.metrics.errors.value(kind="too_large") == 3


def test_full_queue_gets_429_with_retry_after(pipe):
    with serving(pipe, config=EngineConfig(warmup=False, max_active=1, max_queue=1)) as (url, state):
        engine = state.engines[MODEL]
        long = {"prompt": "a circle", "num_inference_steps": 20, "seed": 1}
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url + GEN, json=long, timeout=120)
            wait_until(lambda: len(engine._active) == 1, what="the first request in flight")
            second = pool.submit(httpx.post, url + GEN, json=dict(long, seed=2), timeout=120)
            wait_until(lambda: len(engine._waiting) == 1, what="the second request queued")
            refused = httpx.post(url + GEN, json=dict(long, seed=3), timeout=30)
            err = _error(refused, 429)
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
            assert [f.result().status_code for f in (first, second)] == [200, 200]


def test_twice_the_bound_loses_and_duplicates_nothing(pipe):
    config = EngineConfig(warmup=False, max_active=2, max_queue=2)  # 4 admitted at most
    with serving(pipe, config=config) as (url, state):
        gate = threading.Barrier(8)

        def send(seed):
            gate.wait(10)
            return seed, httpx.post(url + GEN, json={"prompt": "a dot", "num_inference_steps": 3, "seed": seed},
                                    timeout=120)

        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(send, range(100, 108)))
    statuses = sorted(r.status_code for _, r in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4  # a burst is admitted up to the slots plus the queue
    for seed, r in results:  # each answer is its own request's image, once
        if r.status_code == 200:
            assert [d["seed"] for d in r.json()["data"]] == [seed]
    assert state.metrics.images.value(model=MODEL) == statuses.count(200)


def test_request_timeout_is_504_and_stops_the_work(pipe):
    with serving(pipe, limits=Limits(request_timeout=0.3)) as (url, state):
        r = httpx.post(url + GEN, json={"prompt": "x", "num_inference_steps": 150}, timeout=60)
        err = _error(r, 504)
        assert err["type"] == "timeout_error" and err["code"] == "timeout"
        assert state.metrics.stage_seconds.count(model=MODEL, stage="unet") < 150


def test_client_disconnect_cancels_the_work(pipe):
    with serving(pipe, config=EngineConfig(warmup=False, max_active=1)) as (url, state):
        engine = state.engines[MODEL]
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(url + GEN, json={"prompt": "x", "num_inference_steps": 150},
                       timeout=httpx.Timeout(30, read=0.5))
        wait_until(lambda: not engine._active and not engine._waiting, timeout=15, what="the engine to drop it")
        wait_until(lambda: state.metrics.errors.value(kind="disconnect") == 1, timeout=5, what="the metric")
        steps = state.metrics.stage_seconds.count(model=MODEL, stage="unet")
        assert steps < 150, f"the request ran {steps} of 150 steps after its client left"
        # the engine serves the next request normally
        assert httpx.post(url + GEN, json={"prompt": "x", "num_inference_steps": 1}, timeout=60).status_code == 200


def test_shutdown_fails_in_flight_requests_cleanly(pipe):
    with serving(pipe, config=EngineConfig(warmup=False, max_active=1)) as (url, state):
        engine = state.engines[MODEL]
        with cf.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(httpx.post, url + GEN, json={"prompt": "x", "num_inference_steps": 150}, timeout=60)
            queued = pool.submit(httpx.post, url + GEN, json={"prompt": "y", "num_inference_steps": 2}, timeout=60)
            wait_until(lambda: engine._active and engine._waiting, what="one request in flight, one queued")
            engine.shutdown(grace=0)  # what SIGTERM does with --drain 0
            for f in (busy, queued):
                err = _error(f.result(), 503)
                assert err["code"] == "shutting_down" and f.result().headers["retry-after"] == "1"
        late = httpx.post(url + GEN, json={"prompt": "z", "num_inference_steps": 1}, timeout=30)
        assert _error(late, 503)["code"] == "shutting_down"
        assert httpx.get(url + "/readyz", timeout=30).status_code == 503
        assert engine.join(10)
