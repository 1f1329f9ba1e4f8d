"""kill -9 of `edgediff optimize` / `quantize` leaves nothing behind: its worker processes die with it, and the
next run of the same command sweeps the hidden staging folder it left next to OUT. Scratch files live inside that
staging folder, never in the temp folder ($TMPDIR)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc: Linux")]



def _builtin_copy(dst: Path) -> Path:
    from edgediff.builtin_model import default_bundle

    return Path(shutil.copytree(default_bundle(), dst))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from edgediff.cli import main; main()", *args]


def _group(pgid: int) -> list:
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def _workers(main: "psutil.Process") -> list:
    """The main process's workers (engines.isolate)."""
    try:
        return [c for c in main.children() if "edgediff.engines.isolate" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.partial"))


def _kill_midway(args: list[str], out: Path, env: dict, timeout: float = 30.0) -> None:
    """Start the command in its own process group, wait until it stages OUT and runs a worker, kill -9 the main
    process only, and check that no process of the group outlives it by more than a few seconds."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    main = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    try:
        while not (_partials(out) and _workers(main)):
            if proc.poll() is not None:
                pytest.fail(f"{args[3:]} ended (exit {proc.returncode}) before it could be killed midway: "
                            f"{proc.stderr.read().decode()[-500:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{args[3:]} showed no staging folder and worker within {timeout:.0f} s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 3.0
        while _group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _group(proc.pid)]
        assert not left, f"processes outlived the killed {args[3]}: {left}"
        # every writer of the pipe is gone now: an orphaned worker that died on it would have printed here
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err[-3000:]
    finally:
        for p in _group(proc.pid):  # never leave our own strays on the machine, even when the test fails
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.stderr.close()


# --tolerance: this test is about processes and staging folders, not accuracy; INT8's parity depends on the CPU's
# integer kernels (the built-in model's --int8-weights: rel_l2 0.04 with AVX-512 VNNI, 0.18 on an AVX2-only CPU)
@pytest.mark.parametrize("command", [["optimize", "--target", "cpu"], ["quantize", "--int8-weights", "--tolerance", "1"]],
                         ids=["optimize", "quantize"])
def test_kill_leaves_no_process_and_a_rerun_no_leftover(command, tmp_path):
    src = _builtin_copy(tmp_path / "src")
    out = tmp_path / "out"
    temp = tmp_path / "systemp"  # the children's temp folder: anything written there is a leftover
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "EDGEDIFF_DEBUG": "1"}
    args = _cli(command[0], str(src), str(out), *command[1:])

    _kill_midway(args, out, env)
    assert not out.exists()

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "edgediff.json").is_file()
    assert _partials(out) == [], "the re-run left the killed run's staging folder"
    # /tmp/edgediff-opt-*, edgediff-q-*, ort.quant.* were left there by killed runs. (`import onnxruntime` keeps
    # one small ".ses" file there, the same at every run: not a leftover of ours.)
    assert sorted(p.name for p in temp.iterdir() if p.name != ".ses") == []
