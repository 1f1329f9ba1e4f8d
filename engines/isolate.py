"""Run one memory-hungry step in a child process, so that running out of memory is a sentence, not a dead CLI.

When Linux runs out of memory its OOM killer sends SIGKILL to the largest process: nothing in that process can
catch it, and the user's terminal shows only "Killed". Parity checks hold full ONNX Runtime sessions of the graphs
(an SD-1.5 UNet with static 512x512 shapes needed more than this 23 GiB machine has), so they run here: a child
that dies from a signal becomes one EngineError naming the step and the signal, and an exception raised in the child
is re-raised in the caller as it was.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

from edgediff.errors import EngineError


def run_isolated(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh (spawned) process; its return value or its exception. ``fn`` must be a
    module-level function and its arguments and result picklable. ``what`` names the step in the error."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's memory and its ONNX Runtime threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    child.start()
    send.close()  # the child holds the only writer: recv() sees EOF when it dies
    try:
        ok, value = receive.recv()
    except EOFError:
        child.join()
        raise EngineError(_death(what, child.exitcode)) from None
    finally:
        receive.close()
    child.join()
    if ok:
        return value
    raise value


def _child(send, fn, args, kwargs) -> None:
    try:
        result = (True, fn(*args, **kwargs))
    except BaseException as exc:  # handed to the parent, which raises it
        result = (False, exc)
    send.send(result)
    send.close()


def _death(what: str, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return (f"{what} was killed by the operating system ({sig}), most likely out of memory ({_ram()} here); "
                    "nothing was written -- run it on a machine with more memory, or use a smaller shape")
        return f"{what} died from signal {sig}; nothing was written"
    return f"{what} exited with status {exitcode} without a result; nothing was written"


def _ram() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB of RAM"
    except (ValueError, OSError, AttributeError):
        return "RAM size unknown"
