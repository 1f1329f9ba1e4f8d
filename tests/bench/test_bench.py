"""The harness end to end on the tiny fixture (one run, seconds), its outputs, and its refusals."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


def test_smoke_run_writes_every_report(tiny_sd1_bundle, tmp_path):
    r = bench(tiny_sd1_bundle, "--steps", "3", "--runs", "2", "--warmup", "1", "--profile-ops", "3", "--cold-start", "--scheduler", "euler",
              "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv", "--plot", tmp_path / "r.png",
              "--trace", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    assert "loop overhead" in r.output and "not measured" in r.output and "cold start" in r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[2] / "bench" / "schema.json").read_text())
    jsonschema.validate(doc, schema)
    row = doc["results"][0]
    assert row["stages"]["unet"]["n"] == 2 * 3  # runs x steps: warm-up excluded
    assert row["stages"]["total"]["n"] == 2
    assert len(row["ops"]) == 3 and row["ops"][0]["percent"] >= row["ops"][-1]["percent"]
    assert 0 <= row["overhead"]["percent_of_step"] < 100
    assert doc["environment"]["bundle"] and doc["environment"]["not_measured"]
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["unet.mean"]) > 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((tmp_path / "t.json").read_text())
    names = [e["name"] for e in trace["traceEvents"]]
    assert "total" in names and "unet 0" in names and all(e["ph"] == "X" and e["dur"] >= 0 for e in trace["traceEvents"])


def test_sweep_is_a_cartesian_product(tiny_sd1_bundle, tmp_path):
    r = bench("sweep", tiny_sd1_bundle, "--steps", "2,3", "--size", "16x16,24x16", "--runs", "1", "--warmup", "0",
              "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "s.json").read_text())["results"]
    assert sorted((x["config"]["steps"], x["config"]["width"]) for x in rows) == [(2, 16), (2, 24), (3, 16), (3, 24)]


def test_sweep_over_bundles_reports_ratios_to_the_first(tiny_sd1_bundle, bundle_copy, tmp_path):
    r = bench("sweep", tiny_sd1_bundle, bundle_copy, "--steps", "2", "--runs", "1", "--warmup", "0",
              "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    assert "variants vs tiny-sd1 [fp32, as exported]" in r.output
    lines = r.output.split("variants vs")[1].splitlines()
    assert lines[2].split()[0] == "tiny-sd1" and " 1.000" in lines[2]  # the first bundle against itself
    assert lines[3].split()[0] == "bundle"
    rows = json.loads((tmp_path / "v.json").read_text())["results"]
    assert [Path(x["config"]["bundle"]).name for x in rows] == ["tiny-sd1", "bundle"]
    assert rows[0]["variant"]["precision"]["unet"] == "fp32" and rows[0]["variant"]["unet_bytes"] > 0


def test_several_bundles_need_sweep(tiny_sd1_bundle, bundle_copy):
    r = bench(tiny_sd1_bundle, bundle_copy)
    assert r.exit_code != 0 and "edgediff bench sweep B1 B2" in r.output


def test_compare_diffusers(tiny_sd1_bundle):
    pytest.importorskip("diffusers")
    r = bench(tiny_sd1_bundle, "--steps", "2", "--runs", "1", "--compare", "diffusers")
    assert r.exit_code == 0, r.output
    assert "vs diffusers" in r.output and "unet_per_call" in r.output


@pytest.mark.parametrize("args,match", [
    (["--backend", "gpu"], "unknown backend 'gpu'"),
    (["--runs", "0"], "'--runs'"),
    (["--steps", ""], "'--steps'"),
    (["sweep", "--steps", "4,,20"], "without empty entries"),
    (["--steps", "4,20"], "use `edgediff bench sweep`"),
    (["--json", "/nonexistent/dir/r.json"], "does not exist"),
])
def test_bad_input(tiny_sd1_bundle, args, match):
    args = [*args[:1], tiny_sd1_bundle, *args[1:]] if args[0] == "sweep" else [tiny_sd1_bundle, *args]
    r = bench(*args) if "--runs" in args else bench(*args, "--runs", "1")
    assert r.exit_code == 2 and match in r.output, r.output
    assert "Traceback" not in r.output and "loop overhead" not in r.output  # refused before anything ran


def test_compare_without_torch_is_one_line(tiny_sd1_bundle, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "diffusers") else real(name, *a))
    r = bench(tiny_sd1_bundle, "--steps", "2", "--runs", "1", "--compare", "diffusers")
    assert r.exit_code != 0 and "needs torch and diffusers" in r.output


def test_session_levels_compares_creation_and_run(tiny_sd1_bundle):
    r = bench("session-levels", tiny_sd1_bundle, "--size", "32x32", "--repeat", "1")
    assert r.exit_code == 0, r.output
    row = [line for line in r.output.splitlines() if "level=all" in line][0].split()
    assert row[0] == "tiny-sd1" and float(row[2]) > 0 and row[3] == "1.000"


def test_builtin_model_is_benched_with_a_prompt_it_can_read(tiny_sd1_bundle, tmp_path):
    """The SD prompt would be cut by the built-in model's 24-token tokenizer (a warning in every run): it gets the
    README's prompt; other bundles keep the fixed SD one. The prompt is recorded in the JSON row."""
    import warnings

    from edgediff.bench.runner import BUILTIN_PROMPT, PROMPT, prompt_for
    from edgediff.builtin_model import default_bundle

    assert prompt_for(str(default_bundle())) == BUILTIN_PROMPT and prompt_for(str(tiny_sd1_bundle)) == PROMPT
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncation warning fails the run
        r = bench("--steps", "2", "--runs", "1", "--warmup", "0", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["config"]["prompt"] == BUILTIN_PROMPT
