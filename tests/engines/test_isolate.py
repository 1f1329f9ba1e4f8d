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


def test_result_and_keywords_come_back():
    assert run_isolated(_add, 2, 3, what="add", scale=10) == 50


def test_child_exception_is_reraised_with_its_type():
    with pytest.raises(ParityError, match="unet: changed the outputs"):
        run_isolated(_raise_parity, what="parity")


def test_killed_child_is_one_clear_line():
    with pytest.raises(EngineError) as info:
        run_isolated(_killed, what="unet: the parity check at {'sample': [2, 4, 64, 64]}")
    msg = str(info.value)
    assert msg.startswith("unet: the parity check at") and "SIGKILL" in msg and "out of memory" in msg
    assert "GiB of RAM" in msg and "\n" not in msg
