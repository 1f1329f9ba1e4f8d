"""Run a command and record the peak of its whole process tree's resident memory: the sum of RSS over the command and
every descendant, sampled from /proc. ``/usr/bin/time -v`` reports the largest *single* process (the kernel's
high-water mark); ``edgediff optimize`` and ``quantize`` run their heavy steps in child processes next to the parent
(engines/isolate.py), and what has to fit in the machine is the two together.

    python bench/scripts/tree_rss.py RESULT.json -- COMMAND [ARGS...]

Writes ``{"command", "returncode", "tree_peak_bytes", "samples", "interval_s"}`` to RESULT.json and exits with the
command's status. Linux only (it reads /proc). Sampling misses spikes shorter than the interval (0.2 s).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

INTERVAL_S = 0.2
USAGE = "usage: python bench/scripts/tree_rss.py RESULT.json -- COMMAND [ARGS...]"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now (a process that exits while being read is skipped)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        out[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def tree_rss(root: int) -> int:
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            pass
    return total


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    result, command = argv[0], argv[2:]
    proc = subprocess.Popen(command)
    peak, samples, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            samples[0] += 1
            stop.wait(INTERVAL_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    stop.set()
    thread.join()
    with open(result, "w") as f:
        json.dump({"command": command, "returncode": rc, "tree_peak_bytes": peak[0], "samples": samples[0],
                   "interval_s": INTERVAL_S}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
