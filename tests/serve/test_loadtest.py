"""The load tester (serve/loadtest.py, `edgediff bench serve`): its accounting against a real server, its
percentiles, and its refusal of anything but loopback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import serving
from edgediff.errors import InputError
from edgediff.serve.engine import EngineConfig
from edgediff.serve.loadtest import LoadSpec, check_loopback, percentiles, run


def test_every_request_is_an_image_or_a_429(pipe):
    config = EngineConfig(warmup=False, max_active=2, max_queue=1)
    with serving(pipe, config=config) as (url, state):
        report = run(LoadSpec(url=url, concurrency=6, requests=12, steps=2, max_seconds=120))
    assert report.sent == 12 and report.not_sent == 0
    assert report.ok + sum(report.errors.values()) == 12
    assert set(report.errors) <= {"429 queue_full"}
    assert report.ok >= 3 and report.images == report.ok and report.wrong_seed == 0
    assert report.images_per_second > 0 and report.latency_seconds["p50"] <= report.latency_seconds["p99"]


def test_json_output_from_the_command_line(url):
    out = subprocess.run([sys.executable, "-m", "edgediff.serve.loadtest", url, "--concurrency", "2", "--requests",
                          "2", "--steps", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] == 2 and report["errors"] == {} and set(report["latency_seconds"]) == {
        "p50", "p90", "p99", "mean", "max"}


def test_percentiles_are_nearest_rank():
    p = percentiles([float(k) for k in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (50.0, 90.0, 99.0, 100.0)
    assert percentiles([]) == {}


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://192.168.1.2", "http://8.8.8.8:80",
                                 "https://127.0.0.1:8000", "127.0.0.1:8000"])
def test_only_loopback_is_a_target(url):
    with pytest.raises(InputError):
        check_loopback(url)  # IP literals and schemes are judged locally: nothing is sent anywhere


def test_loopback_forms_are_accepted():
    assert check_loopback("http://127.0.0.1:8000")[:2] == ("127.0.0.1", 8000)
    assert check_loopback("http://localhost:9/x/")[2] == "/x"
