"""bench/scripts/tree_rss.py (used by bench/scripts/measure_sdxl.sh): the peak of the whole process tree's RSS, which
/usr/bin/time -v (the largest single process) does not give for a parent and its child holding memory together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "bench" / "scripts" / "tree_rss.py"
MB = 2**20
# a parent holding 150 MB runs a child holding 150 MB for a second; the child exits with status 3
HOLD = "import time; a = bytearray({n} * 2**20); time.sleep(1.5)"
CHILD = HOLD.format(n=150) + "; raise SystemExit(3)"
PARENT = (f"import subprocess, sys; {HOLD.format(n=150)}; "
          f"sys.exit(subprocess.run([sys.executable, '-c', {CHILD!r}]).returncode)")


def test_tree_peak_sums_parent_and_child_and_keeps_the_exit_status(tmp_path):
    out = tmp_path / "r.json"
    rc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--", sys.executable, "-c", PARENT]).returncode
    result = json.loads(out.read_text())
    assert rc == 3 and result["returncode"] == 3
    assert result["tree_peak_bytes"] > 290 * MB, result  # both at once; either alone is ~160 MB
    assert result["samples"] > 3


def test_without_a_command_it_says_how_to_call_it(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "tree_rss.py RESULT.json -- COMMAND" in r.stderr
