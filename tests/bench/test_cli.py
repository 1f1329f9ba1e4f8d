"""``edgediff bench`` as a click group: the default command and the others, values refused instead of replaced,
report paths checked before the bench runs, and `edgediff --help` not importing any of it. On the built-in model
(~15 MB, one step: about a second a run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main

FAST = ("--steps", "1", "--runs", "1", "--warmup", "0")


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


@pytest.fixture
def nothing_measured(monkeypatch):
    """Fail the test if a single configuration is measured: the refusal must come first."""
    def refuse(*a, **k):
        raise AssertionError("measured before the bad input was refused")

    monkeypatch.setattr("edgediff.bench.sweep.measure", refuse)
    monkeypatch.setattr("edgediff.bench.runner.cold_start", refuse)


def test_bench_without_a_command_is_the_run_command(tmp_path):
    """`edgediff bench [OPTIONS]` is `edgediff bench run [OPTIONS]`: same table, same JSON."""
    a = bench(*FAST, "--json", tmp_path / "a.json")
    b = bench("run", *FAST, "--json", tmp_path / "b.json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for r in (a, b):
        assert "cpu  steps 1  size native  batch 1" in r.output and "loop overhead" in r.output
    rows = [json.loads((tmp_path / n).read_text())["results"] for n in ("a.json", "b.json")]
    assert [x["config"]["steps"] for x in rows[0] + rows[1]] == [1, 1]
    assert rows[0][0]["config"]["bundle"] == rows[1][0]["config"]["bundle"]


def test_help_lists_the_commands_and_edgediff_help_imports_none_of_them():
    r = bench("--help")
    assert r.exit_code == 0
    for command in ("run", "sweep", "cold-start", "memory-modes", "session-levels", "serve"):
        assert f"  {command} " in r.output
    code = "import sys, edgediff.cli; print(sorted(m for m in sys.modules if m.startswith('edgediff.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_steps_default_to_the_bundles_own(tiny_sd1_bundle, tmp_path):
    """No --steps: the bundle's recommended count, else the runtime default (it was a hard-coded 20); the row
    records the count that ran."""
    from edgediff.bundle.reader import Bundle

    r = bench(tiny_sd1_bundle, "--runs", "1", "--warmup", "0", "--scheduler", "euler", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    row = json.loads((tmp_path / "r.json").read_text())["results"][0]
    expected = Bundle.open(tiny_sd1_bundle).default_steps
    assert expected != 20 and row["config"]["steps"] == expected
    assert row["stages"]["unet"]["n"] == expected  # one run x its steps (euler: one UNet call a step)


@pytest.mark.parametrize("args,option", [
    (["--steps", "0"], "--steps"),  # ran 20 steps
    (["--batch", "0"], "--batch"),  # ran a batch of 1
    (["--steps", "1001"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--profile-ops", "-3"], "--profile-ops"),
    (["sweep", "--steps", "2,0"], "--steps"),
    (["sweep", "--batch", "1,0"], "--batch"),
    (["sweep", "--size", "64x64,0x64"], "--size"),
    (["cold-start", "--steps", "0"], "--steps"),
    (["cold-start", "--runs", "0"], "--runs"),
])
def test_zero_and_out_of_range_values_are_refused_not_replaced(nothing_measured, args, option):
    r = bench(*args) if args[0] in ("sweep", "cold-start") else bench(*args, "--runs", "1")
    assert r.exit_code == 2, r.output
    assert f"'{option}'" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot", "--trace"])
@pytest.mark.parametrize("target", ["folder", "missing folder", "proc", "name too long"])
def test_unwritable_report_is_refused_before_the_bench_runs(nothing_measured, tmp_path, option, target):
    """It used to fail after the whole bench had run (an internal error, exit 70, the results lost)."""
    path = {"folder": tmp_path, "missing folder": tmp_path / "nope" / "r.out", "proc": Path("/proc/edgediff-bench.out"),
            "name too long": tmp_path / ("r" * 300)}[target]
    r = bench(*FAST, option, path)
    assert r.exit_code == 2, r.output
    assert f"error: {option} " in r.output and "internal error" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_into_a_read_only_folder_is_refused_before_the_bench_runs(nothing_measured, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r = bench(*FAST, "--json", ro / "r.json")
    assert r.exit_code == 2 and "error: --json" in r.output, r.output


def test_reports_replace_old_ones_only_with_overwrite_and_leave_no_temp_files(tmp_path):
    old = tmp_path / "r.json"
    old.write_text("old results\n")
    r = bench(*FAST, "--json", old, "--csv", tmp_path / "r.csv")
    assert r.exit_code != 0 and "exists; choose another name or pass --overwrite" in r.output
    assert old.read_text() == "old results\n" and not (tmp_path / "r.csv").exists()
    r = bench(*FAST, "--json", old, "--csv", tmp_path / "r.csv", "--trace", tmp_path / "t.json", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads(old.read_text())["results"][0]["config"]["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json", "t.json"]  # no probe or temp file left


def test_cold_start_command_times_fresh_processes():
    r = bench("cold-start", "--steps", "1", "--runs", "1")
    assert r.exit_code == 0, r.output
    assert "cold start of shapes: cpu  steps 1" in r.output and "(1 fresh processes)" in r.output
    for phase in ("interpreter + imports", "load (sessions)", "first image", "total"):
        line = [x for x in r.output.splitlines() if x.strip().startswith(phase)][0]
        assert float(line.split()[-3]) > 0  # the mean


def test_memory_modes_command_runs_each_mode_in_its_own_process():
    from edgediff.builtin_model import default_bundle

    r = bench("memory-modes", default_bundle(), "--steps", "1", "--modes", "default,low-memory")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert [x.split()[0] for x in lines] == ["default", "low-memory"] and all("peak RSS" in x for x in lines)


def test_memory_modes_refuses_an_unknown_mode_before_running_any(monkeypatch):
    from edgediff.builtin_model import default_bundle

    monkeypatch.setattr("edgediff.bench.memory_modes.measure", lambda *a: pytest.fail("a mode ran"))
    r = bench("memory-modes", default_bundle(), "--modes", "default,nope")
    assert r.exit_code == 2 and "'nope' is not one of" in r.output and "low-memory" in r.output, r.output
