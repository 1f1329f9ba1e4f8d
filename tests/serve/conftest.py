"""Servers for the serve tests: the real app under uvicorn on a free loopback port, in a thread of the test
process (so a test can reach its engines), over the built-in model. Every request loop in these tests is bounded
in count and time, and only 127.0.0.1 is ever contacted."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")
pytest.importorskip("uvicorn", reason="needs the [serve] extra")
httpx = pytest.importorskip("httpx", reason="the serve tests talk plain HTTP with httpx (the [dev] extra)")

from edgediff import Pipeline  # noqa: E402
from edgediff.builtin_model import default_bundle  # noqa: E402
from edgediff.serve.engine import Engine, EngineConfig  # noqa: E402
from edgediff.serve.metrics import ServerMetrics  # noqa: E402
from edgediff.serve.server import bind, make_server  # noqa: E402
from edgediff.serve.state import Limits, ServerState  # noqa: E402

MODEL = "shapes"
STEPS = 4  # enough to exercise the schedulers, short enough for a 2-core CI machine


@pytest.fixture(scope="session")
def pipe():
    with Pipeline.load(default_bundle()) as p:
        yield p


@contextmanager
def serving(pipe, *, config: EngineConfig = EngineConfig(warmup=False), limits: Limits = Limits(),
            api_key: str | None = None, drain: float = 10.0):
    """A running server over ``pipe``: yields (base URL, ServerState); stops it on exit (a graceful shutdown)."""
    metrics = ServerMetrics()
    engine = Engine(MODEL, pipe, config, metrics).start()
    assert engine.ready.wait(60)
    state = ServerState({MODEL: engine}, limits=limits, api_key=api_key, metrics=metrics)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(state, host="127.0.0.1", port=port, drain=drain)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="session")
def server(pipe):
    """The shared server: default limits, batching on, warm-up run (as `edgediff serve` does)."""
    with serving(pipe, config=EngineConfig(warmup=True)) as (url, state):
        yield url, state


@pytest.fixture(scope="session")
def url(server):
    return server[0]


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
