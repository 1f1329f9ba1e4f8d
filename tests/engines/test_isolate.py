"""A step that the OS kills (as the OOM killer does) becomes one EngineError; results and exceptions cross over."""
from __future__ import annotations

import os
import signal

import pytest

from edgediff.engines.isolate import run_isolated
from edgediff.errors import EngineError, ParityError


def _add(a, b, *, scale=1):
    return (a + b) * scale


def _raise_parity():
    raise ParityError("unet: changed the outputs")


def _killed():
    os.kill(os.getpid(), signal.SIGKILL)


def _unsendable():
    return lambda: None


def test_result_and_keywords_come_back():
    assert run_isolated(_add, 2, 3, what="add", scale=10) == 50


def test_child_exception_is_reraised_with_its_type():
    with pytest.raises(ParityError, match="unet: changed the outputs"):
        run_isolated(_raise_parity, what="parity")


def test_a_result_that_cannot_cross_is_one_line():
    with pytest.raises(EngineError, match="internal: the child's result cannot be sent back"):
        run_isolated(_unsendable, what="unsendable")


def test_killed_child_is_one_clear_line():
    with pytest.raises(EngineError) as info:
        run_isolated(_killed, what="unet: the parity check at {'sample': [2, 4, 64, 64]}")
    msg = str(info.value)
    assert msg.startswith("unet: the parity check at") and "SIGKILL" in msg and "out of memory" in msg
    assert "GiB of RAM" in msg and "\n" not in msg


def test_the_worker_dies_with_its_parent():
    """kill -9 of the process that waits for a worker: the worker must not run on (and die later on the closed
    pipe with a BrokenPipeError traceback)."""
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    code = "import time\nfrom edgediff.engines.isolate import run_isolated\nrun_isolated(time.sleep, 600, what='sleep')\n"
    parent = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 30
        while not workers and time.monotonic() < deadline and parent.poll() is None:
            workers = [c for c in psutil.Process(parent.pid).children()
                       if "edgediff.engines.isolate" in " ".join(c.cmdline())]
            time.sleep(0.02)
        assert workers, "no worker was started"
        time.sleep(0.5)  # let it get past its start-up: it is then waiting in time.sleep(600)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=3)
        assert not alive, f"worker {alive[0].pid} outlived its parent"
        assert b"Traceback" not in parent.stderr.read()
    finally:
        for w in workers:
            try:
                w.kill()
            except psutil.Error:
                pass
        parent.stderr.close()
