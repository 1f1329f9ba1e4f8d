"""Ray Serve (serve/ray_app.py) on a local Ray instance: two replicas behind the router serve the OpenAI route with
the images Pipeline gives alone, requests are routed by model (@serve.multiplexed), and a replica killed while
requests are in flight is replaced without any request going unanswered. Skipped without the [serve-ray] extra."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="needs the [serve-ray] extra (ray[serve])")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from edgediff.builtin_model import default_bundle  # noqa: E402

APP = "edgediff"


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments["EdgediffReplica"]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def ray_url():
    from edgediff.serve.ray_app import app_builder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="edgediff-test")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # two names for one bundle: enough to see requests routed by model without loading a second model
        serve.run(app_builder({"models": f"shapes,copy={default_bundle()}", "num_replicas": "2"}), name=APP,
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_pipelines_images(ray_url, pipe):
    assert _running_replicas() == 2
    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    res = client.images.generate(prompt="a red circle", extra_body={"num_inference_steps": 4, "seed": 8})
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).convert("RGB"))
    alone = np.asarray(pipe("a red circle", num_inference_steps=4, seed=8).images[0])
    assert served.tobytes() == alone.tobytes()


def test_requests_are_routed_by_model(ray_url):
    ids = [m["id"] for m in httpx.get(ray_url + "/v1/models", timeout=60).json()["data"]]
    assert ids == ["shapes", "copy"]
    r = httpx.post(ray_url + "/v1/images/generations", timeout=120,
                   json={"prompt": "a square", "model": "copy", "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert json.loads(png.text["parameters"])["model"] == "copy"
    bad = httpx.post(ray_url + "/v1/images/generations", json={"prompt": "x", "model": "nope"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


def test_a_killed_replica_is_replaced_and_no_request_goes_unanswered(ray_url):
    def send(seed):
        return httpx.post(ray_url + "/v1/images/generations", timeout=120,
                          json={"prompt": "a dot", "num_inference_steps": 20, "seed": seed})

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EdgediffReplica" in a["name"]]
    assert len(replicas) == 2
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, seed) for seed in range(6)]
        time.sleep(0.5)  # requests are in flight on both replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        answers = [f.result(timeout=180) for f in futures]
    for seed, r in enumerate(answers):  # each one answered: its own image, or an OpenAI error to retry on
        if r.status_code == 200:
            assert r.json()["data"][0]["seed"] == seed
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable", r.text
    assert sum(r.status_code == 200 for r in answers) >= 1
    deadline = time.monotonic() + 120
    while _running_replicas() < 2:  # Ray starts a new replica in its place
        assert time.monotonic() < deadline, "the killed replica was not replaced within 120 s"
        time.sleep(0.5)
