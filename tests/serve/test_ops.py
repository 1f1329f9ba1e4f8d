"""Operations: health and readiness, Prometheus /metrics content, CORS off."""
from __future__ import annotations

import re

import httpx

from conftest import MODEL

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+$|^[a-z_]+\{.*le="\+Inf".*\} \d+$')


def test_health_and_readiness(url):
    assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    r = httpx.get(url + "/readyz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ready"


def _metrics(url) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP edgediff_", "# TYPE edgediff_")), line
            continue
        assert SAMPLE.match(line), f"not Prometheus text format: {line!r}"
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_metrics_report_queue_stages_images_and_errors(url):
    before = _metrics(url)
    images_key = f'edgediff_images_total{{model="{MODEL}"}}'
    ok = httpx.post(url + "/v1/images/generations", json={"prompt": "a circle", "n": 2, "num_inference_steps": 2},
                    timeout=60)
    assert ok.status_code == 200
    bad = httpx.post(url + "/v1/images/generations", json={"prompt": "a circle", "n": 0}, timeout=60)
    assert bad.status_code == 400
    after = _metrics(url)
    assert after[images_key] - before.get(images_key, 0) == 2
    assert after[f'edgediff_queue_depth{{model="{MODEL}"}}'] == 0
    assert after[f'edgediff_inflight{{model="{MODEL}"}}'] == 0
    for stage in ("queue", "start", "unet", "finish", "encode", "total"):
        assert after[f'edgediff_stage_seconds_count{{model="{MODEL}",stage="{stage}"}}'] >= 1, stage
    assert after[f'edgediff_unet_batch_rows_count{{model="{MODEL}"}}'] >= 2
    key = 'edgediff_requests_total{route="/v1/images/generations",status="400"}'
    assert after[key] - before.get(key, 0) == 1
    err = 'edgediff_errors_total{kind="invalid_request"}'
    assert after[err] - before.get(err, 0) == 1


def test_cors_is_off(url):
    r = httpx.get(url + "/v1/models", headers={"Origin": "https://elsewhere.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(url + "/v1/images/generations", timeout=30,
                        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code == 405
