"""`edgediff bench sweep` with speed levers (bench/quality.py): every lever against the plain run of the same
configuration, interleaved, same seeds; PSNR/SSIM recomputed here from images the pipeline makes for those seeds; and
every refusal before anything is measured. On the tiny SD1 fixture exported with a random tiny autoencoder."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.bench.quality import psnr, ssim
from edgediff.bench.runner import Samples
from edgediff.cli import main
from edgediff.timing import Span

pytest.importorskip("diffusers")

from tiny_vae_fixtures import tiny_sd1_with_taesd  # noqa: E402

FAST = ("--steps", "2", "--runs", "2", "--warmup", "0")


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def taesd_bundle(tiny_sd1_source, tmp_path_factory) -> Path:
    return tiny_sd1_with_taesd(tiny_sd1_source, tmp_path_factory).bundle


@pytest.fixture
def nothing_measured(monkeypatch):
    """Fail the test if a single generation is timed: the refusal must come first."""
    def refuse(*a, **k):
        raise AssertionError("measured before the bad input was refused")

    monkeypatch.setattr("edgediff.bench.sweep.measure", refuse)
    monkeypatch.setattr("edgediff.bench.quality.measure_levers", refuse)


def test_levers_against_the_plain_run(taesd_bundle, tmp_path):
    out = tmp_path / "levers.json"
    r = bench("sweep", taesd_bundle, *FAST, "--guidance", "7.5", "--decoder", "full,tiny", "--cfg-cutoff", "0.5,1",
              "--vae-tiling", "--json", out, "--csv", tmp_path / "levers.csv")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads((Path(__file__).parents[2] / "bench" / "schema.json").read_text()))
    rows = {row["lever"]["name"]: row for row in doc["results"]}
    # decoder=full is the plain run's own decoder: no lever of its own
    assert list(rows) == ["plain", "decoder=tiny", "cfg_cutoff=0.5", "cfg_cutoff=1", "vae_tiling"]
    assert rows["plain"]["lever"]["vs"] is None and rows["plain"]["stages"]["total"]["n"] == 2
    for name in ("decoder=tiny", "cfg_cutoff=0.5", "vae_tiling"):
        lv = rows[name]["lever"]
        assert lv["vs"] == "plain" and lv["quality"]["images"] == 2
        assert rows[name]["stages"]["unet"]["n"] == rows["plain"]["stages"]["unet"]["n"]  # every step, both runs
        assert all(v > 0 for v in lv["ratio"].values()), lv
    assert rows["decoder=tiny"]["lever"]["options"] == {"decoder": "tiny"}
    # a cutoff of 1 never fires (diffusers' semantics): the same images as the plain run, seed for seed
    assert rows["cfg_cutoff=1"]["lever"]["quality"]["psnr"]["min"] == 100.0
    assert rows["cfg_cutoff=1"]["lever"]["quality"]["ssim"]["min"] == pytest.approx(1.0)
    # a random tiny decoder draws something else than the VAE: a real quality cost, recomputed here
    with Pipeline.load(taesd_bundle) as pipe:
        cfg = rows["plain"]["config"]
        seeds = [cfg["seed"] + 1000 * (k + 1) for k in range(cfg["runs"])]
        kw = dict(num_inference_steps=2, guidance_scale=7.5)
        pairs = [(np.asarray(pipe(cfg["prompt"], seed=s, decoder="tiny", **kw).images[0]),
                  np.asarray(pipe(cfg["prompt"], seed=s, **kw).images[0])) for s in seeds]
    q = rows["decoder=tiny"]["lever"]["quality"]
    assert q["psnr"]["mean"] == pytest.approx(np.mean([psnr(a, b) for a, b in pairs]), abs=1e-6) and q["psnr"]["mean"] < 40
    assert q["ssim"]["min"] == pytest.approx(min(ssim(a, b) for a, b in pairs), abs=1e-6)
    assert "speed levers vs the plain run" in r.output and "decoder=tiny" in r.output.split("speed levers")[1]
    assert "load nan" not in r.output and "loaded with the row above" in r.output  # one load for all levers
    csv_head = (tmp_path / "levers.csv").read_text().splitlines()[0]
    assert "lever.ratio.latency_per_image" in csv_head and "lever.ssim.mean" in csv_head


def test_vae_tile_sizes_are_one_tiled_lever_each():
    from edgediff.bench.quality import levers

    assert [(lv.name, lv.kwargs()) for lv in levers(vae_tiling=True)] == [("vae_tiling", {"vae_tiling": True})]
    assert [(lv.name, lv.kwargs()) for lv in levers(vae_tiling=True, vae_tile_size=(256, 384, 256))] == [
        ("vae_tiling,tile=256", {"vae_tiling": True, "vae_tile_size": 256}),
        ("vae_tiling,tile=384", {"vae_tiling": True, "vae_tile_size": 384})]


def test_samples_count_any_graph_a_step_runs_as_its_backend_call():
    """A step that runs another graph (DeepCache's shallow UNet has its own span name) is a UNet call, not loop
    overhead: the unet stage and the UNet time per image include it."""
    spans = [Span("step", 0.0, 1.0, 0), Span("scheduler", 0.0, 0.1, 0), Span("unet", 0.1, 0.9, 0),
             Span("step", 1.0, 1.5, 1), Span("scheduler", 1.0, 1.1, 1), Span("unet_shallow", 1.1, 1.4, 1)]
    s = Samples()
    s.add(SimpleNamespace(timings={"total": 2.0, "vae_decode": 0.3}, spans=spans, seeds=(0, 1)))
    assert s.per_stage["unet"] == pytest.approx([0.8, 0.3])
    assert s.unet_per_image == pytest.approx([1.1 / 2])
    assert s.overhead_us == pytest.approx([0.2e6, 0.2e6])


@pytest.mark.parametrize("args,match", [
    (["--decoder", "tiny"], "bench lever decoder=tiny: decoder='tiny' needs a tiny autoencoder"),
    (["--decoder", "small"], "'small' is not one of 'full', 'tiny'"),
    (["--cfg-cutoff", "1.5"], "--cfg-cutoff"),
    (["--cache-interval", "0"], "--cache-interval"),
    (["--cache-branch", "1"], "--cache-branch picks DeepCache's cached block and needs --cache-interval N"),
    (["--cache-schedule", "quadratic"],
     "--cache-schedule, --cache-center and --cache-pow shape DeepCache's schedule and need --cache-interval N"),
    (["--cache-pow", "1.4"], "and need --cache-interval N"),
    (["--cache-schedule", "poisson"], "'poisson' is not one of 'uniform', 'quadratic'"),
    (["--decoder", "tiny", "--cold-start"], "--cold-start does not combine with the speed levers"),
    (["--vae-tiling", "--profile-ops", "2"], "--profile-ops does not combine with the speed levers"),
    (["--vae-tile-size", "64"], "--vae-tile-size sets the tile of the --vae-tiling lever; add --vae-tiling"),
    (["--vae-tiling", "--vae-tile-size", "8,12"],
     "bench lever vae_tiling,tile=12: vae_tile_size=12: use a positive multiple of 8 pixels"),
])
def test_levers_refused_in_one_line_before_measuring(tiny_sd1_bundle, nothing_measured, args, match):
    r = bench("sweep", tiny_sd1_bundle, *FAST, *args)
    assert r.exit_code not in (0, 70) and match in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) <= 3, r.output  # click's usage + line


def test_a_later_bundle_without_the_tiny_decoder_is_refused_before_the_first_is_measured(
        taesd_bundle, tiny_sd1_bundle, nothing_measured):
    r = bench("sweep", taesd_bundle, tiny_sd1_bundle, *FAST, "--decoder", "tiny")
    assert r.exit_code == 2 and "tiny-sd1 has no vae_decoder_tiny" in r.output, r.output


def test_cache_interval_is_passed_to_the_pipeline(tiny_sd1_bundle, nothing_measured, monkeypatch):
    """--cache-interval N (with --cache-branch B) reaches Pipeline.request as cache_interval=N, cache_branch=B; the
    pipeline's own refusal (a bundle without DeepCache's shallow UNet) is the one line the sweep prints."""
    seen = []
    original = Pipeline.request

    def spy(self, *a, **kw):
        seen.append({k: kw[k] for k in ("cache_interval", "cache_branch") if k in kw})
        return original(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "request", spy)
    r = bench("sweep", tiny_sd1_bundle, *FAST, "--cache-interval", "3", "--cache-branch", "1")
    assert {"cache_interval": 3, "cache_branch": 1} in seen
    assert r.exit_code in (1, 2) and r.output.startswith("error: bench lever cache_interval=3,branch=1: "), r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_cache_schedule_is_passed_to_the_pipeline(tiny_sd1_bundle, nothing_measured, monkeypatch):
    """--cache-schedule quadratic --cache-center C --cache-pow P ride along with each --cache-interval lever."""
    from edgediff.bench.quality import levers

    got = levers(cache_interval=(2, 3), cache_branch=0, cache_schedule="quadratic", cache_center=6, cache_pow=1.4)
    assert [(lv.name, lv.kwargs()) for lv in got] == [
        (f"cache_interval={n},branch=0,schedule=quadratic,center=6,pow=1.4",
         dict(cache_interval=n, cache_branch=0, cache_schedule="quadratic", cache_center=6, cache_pow=1.4))
        for n in (2, 3)]
    assert [lv.kwargs() for lv in levers(cache_interval=(3,))] == [dict(cache_interval=3)]  # default: as before
    seen = []
    original = Pipeline.request

    def spy(self, *a, **kw):
        seen.append({k: kw[k] for k in ("cache_interval", "cache_schedule", "cache_center", "cache_pow") if k in kw})
        return original(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "request", spy)
    r = bench("sweep", tiny_sd1_bundle, *FAST, "--cache-interval", "3", "--cache-schedule", "quadratic",
              "--cache-center", "2", "--cache-pow", "1.4")
    assert {"cache_interval": 3, "cache_schedule": "quadratic", "cache_center": 2, "cache_pow": 1.4} in seen
    assert r.exit_code in (1, 2) and r.output.startswith(
        "error: bench lever cache_interval=3,schedule=quadratic,center=2,pow=1.4: "), r.output


def test_the_table_shows_whole_lever_names():
    """Two DeepCache levers that differ only past the 25th character (the schedule) stay apart in the table."""
    from edgediff.bench.quality import table

    def row(name, vs="plain"):
        q = {"psnr": {"mean": 40.0, "min": 39.0}, "ssim": {"mean": 0.99, "min": 0.98}}
        return {"config": dict(bundle="b", backend="cpu", steps=20, height=64, width=64, batch=1, scheduler=None),
                "latency_per_image": 1.0,
                "lever": {"name": name, "vs": vs, "quality": q,
                          "ratio": {"latency_per_image": 0.8, "unet_per_image": 0.7, "vae_decode": 1.0}}}

    names = ["cache_interval=3,branch=0", "cache_interval=3,branch=0,schedule=quadratic,center=15,pow=2"]
    text = table([row("plain", None), *(row(n) for n in names)])
    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[-2:]] == names, text
    assert len({ln.index("0.800") for ln in lines[-2:]}) == 1, text  # the columns stay aligned
