"""Run one memory-hungry step in a child process, so that running out of memory is a sentence, not a dead CLI.

When Linux runs out of memory its OOM killer sends SIGKILL to the largest process: nothing in that process can
catch it, and the user's terminal shows only "Killed". Parity checks hold full ONNX Runtime sessions of the graphs
(an SD-1.5 UNet with static 512x512 shapes needed more than this 23 GiB machine has), so they run here: a child
that dies from a signal becomes one EngineError naming the step and the signal, and an exception raised in the child
is re-raised in the caller as it was.

The child dies with its parent: a parent killed with SIGKILL (kill -9, or the OOM killer picking it) runs no
clean-up, and a worker left running would finish minutes of work for nobody, then die on the closed pipe with a
traceback on the user's terminal. The child is a plain ``python -c`` process rather than a multiprocessing one:
multiprocessing adds a resource-tracker process that outlives a killed parent too, and its spawned child prints
a traceback of its own when the parent dies while handing the work over.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from edgediff.errors import EngineError


def run_isolated(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh process; its return value or its exception. ``fn`` must be a module-level
    function and its arguments and result picklable. ``what`` names the step in the error."""
    work = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    # The child imports nothing but this module before it is tied to this process (_serve): unpickling the work
    # imports fn's module (ONNX Runtime, the pipeline), seconds during which a kill of this process went unseen.
    # It gets this process's sys.path, so that it finds fn's module as this process did.
    code = f"import sys; sys.path[:] = {sys.path!r}; import edgediff.engines.isolate as i; i._serve({os.getpid()}, %d)"
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-c", code % write_end], stdin=subprocess.PIPE,
                                 pass_fds=(write_end,))
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the child holds the only writer: reading sees EOF when it ends
    try:
        with open(read_end, "rb") as results:
            try:
                with child.stdin:
                    child.stdin.write(work)
            except BrokenPipeError:  # it died before it read its work: its exit status says how
                pass
            data = results.read()
        child.wait()
    finally:
        if child.poll() is None:  # this process is being interrupted (Ctrl-C): the child's work is for nobody
            child.kill()
            child.wait()
    if not data:
        raise EngineError(_death(what, child.returncode))
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


def _serve(parent: int, fd: int) -> None:
    """The child's side: the work from stdin, the pickled (ok, result or exception) to ``fd``."""
    _die_with(parent)
    with os.fdopen(fd, "wb") as out:
        try:
            fn, args, kwargs = pickle.loads(sys.stdin.buffer.read())
            result = (True, fn(*args, **kwargs))
        except BaseException as exc:  # handed to the parent, which raises it
            result = (False, exc)
        try:
            data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a result or an exception that cannot cross
            kind = "result" if result[0] else f"{type(result[1]).__name__} ({result[1]})"
            data = pickle.dumps((False, EngineError(f"internal: the child's {kind} cannot be sent back: {exc}")))
        try:
            out.write(data)
            out.flush()
        except BrokenPipeError:  # the parent is gone (non-Linux, between two looks of _watch)
            os._exit(1)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends. Linux: the kernel sends SIGKILL when the parent dies
    (PR_SET_PDEATHSIG); elsewhere a thread notices that the process was re-parented. Both are checked against the
    parent's pid, since it may have died before this ran."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:
                    os._exit(1)
                return
        except (OSError, AttributeError):  # no prctl in this libc: fall back to watching
            pass
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="edgediff-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)  # no clean-up: the parent that would receive the result is gone


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
