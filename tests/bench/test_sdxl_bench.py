"""``edgediff bench`` on SDXL bundles (the tiny random SDXL base of tests/sdxl_fixtures.py, exported once a session):
the text stage is both towers, guidance defaults to the bundle's own, ``--compare diffusers`` runs diffusers'
StableDiffusionXLPipeline like for like (a Turbo bundle too: guidance 0, 1 step, trailing), and a refiner is refused
before anything loads. Fast settings: one step, one run, no warm-up."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main

FAST = ("--steps", "1", "--runs", "1", "--warmup", "0")


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


def results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


@pytest.fixture(scope="module")
def turbo(tiny_sdxl_base, tmp_path_factory) -> Path:
    """The tiny SDXL with SDXL-Turbo's scheduler (Euler a, trailing timesteps), exported as Turbo presets are:
    recommended 1 step, guidance 0."""
    from edgediff.bundle.manifest import GenerationDefaults
    from edgediff.export.pipeline_export import export_pipeline

    src = tmp_path_factory.mktemp("src") / "tiny-sdxl-turbo"
    shutil.copytree(tiny_sdxl_base.source, src)
    sched = src / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text())
    config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    sched.write_text(json.dumps(config))
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (src / "model_index.json").write_text(json.dumps(index))
    return export_pipeline(src, tmp_path_factory.mktemp("bundles") / "tiny-sdxl-turbo",
                           defaults=GenerationDefaults(steps=1, guidance_scale=0.0))


def test_text_stage_is_both_towers_and_guidance_is_the_bundles(tiny_sdxl_base, tiny_sd1_bundle, tmp_path):
    """SDXL times tokenizing and both text encoders as one span: the row has no tokenize stage (it had one of 0 ms,
    which said tokenizing was free) and says what text_encoder covers. No --guidance: the bundle's own (SDXL's
    diffusers default 5.0; it was a fixed 7.5)."""
    from edgediff.bundle.reader import Bundle

    r = bench(tiny_sdxl_base.bundle, *FAST, "--json", tmp_path / "x.json")
    assert r.exit_code == 0, r.output
    row = results(tmp_path / "x.json")[0]
    assert "tokenize" not in row["stages"] and row["stages"]["text_encoder"]["mean"] > 0
    assert row["stages"]["unet"]["n"] == 1
    assert row["variant"]["family"] == "sdxl"
    assert row["variant"]["text_encoders"] == ["text_encoder", "text_encoder_2"]
    assert "one span over the tokenizers and text_encoder + text_encoder_2" in r.output
    assert row["config"]["guidance"] == Bundle.open(tiny_sdxl_base.bundle).default_guidance == 5.0

    r = bench(tiny_sd1_bundle, *FAST, "--json", tmp_path / "sd.json")  # SD keeps its separate tokenize stage
    assert r.exit_code == 0, r.output
    assert {"tokenize", "text_encoder"} <= set(results(tmp_path / "sd.json")[0]["stages"])
    assert "one span over" not in r.output


def test_sweep_on_sdxl(tiny_sdxl_base, tmp_path):
    r = bench("sweep", tiny_sdxl_base.bundle, "--steps", "1,2", "--size", "16x16,32x16", "--runs", "1",
              "--warmup", "0", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    rows = results(tmp_path / "s.json")
    assert sorted((x["config"]["steps"], x["config"]["width"], x["stages"]["unet"]["n"]) for x in rows) == [
        (1, 16, 1), (1, 32, 1), (2, 16, 2), (2, 32, 2)]  # euler: one UNet call a step


def test_compare_runs_diffusers_sdxl_pipeline_like_for_like(tiny_sdxl_base, tmp_path):
    """The worker loads StableDiffusionXLPipeline from the source the bundle records (it loaded the SD pipeline
    and failed), runs the same timesteps and UNet batch (checked), and times both towers' prompt encoding."""
    jsonschema = pytest.importorskip("jsonschema")
    r = bench(tiny_sdxl_base.bundle, *FAST, "--compare", "diffusers", "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    jsonschema.validate(doc, json.loads((Path(__file__).parents[2] / "bench" / "schema.json").read_text()))
    cmp = doc["results"][0]["compare"]
    assert cmp["reference"]["pipeline"] == "StableDiffusionXLPipeline"
    assert Path(cmp["reference"]["source"]) == Path(tiny_sdxl_base.source)  # the default --reference
    assert cmp["computation"] == {"scheduler": "euler", "timesteps": [1.0], "unet_batch": [2],  # guidance 5: CFG
                                  "diffusers_scheduler": "EulerDiscreteScheduler", "timestep_spacing": "leading"}
    for key in ("text_encoder", "unet_per_call", "vae_decode", "total"):
        assert cmp["theirs"][key] > 0 and cmp["ratio"][key] > 0, key
    assert cmp["peak_rss_bytes"]["ours"] > 0 and cmp["peak_rss_bytes"]["ratio"] > 0
    assert "StableDiffusionXLPipeline" in r.output and "UNet batch 2" in r.output and "peak RSS" in r.output


def test_turbo_compare_is_like_for_like_whatever_the_reference(turbo, tiny_sdxl_base, tmp_path):
    """A Turbo bundle benches at its recommended 1 step and guidance 0 (one UNet batch of 1 on both sides), and
    diffusers runs the bundle's scheduler config (Euler a, trailing: timestep 999) even when --reference points at a
    folder whose scheduler is Euler with leading spacing (which would have run timestep 1)."""
    r = bench(turbo, "--runs", "1", "--warmup", "0", "--compare", "diffusers", "--reference", tiny_sdxl_base.source,
              "--json", tmp_path / "t.json")
    assert r.exit_code == 0, r.output
    row = results(tmp_path / "t.json")[0]
    assert (row["config"]["steps"], row["config"]["guidance"]) == (1, 0.0)
    assert row["compare"]["computation"] == {
        "scheduler": "euler_a", "timesteps": [999.0], "unet_batch": [1],
        "diffusers_scheduler": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


def test_sequential_compare_closes_ours_before_diffusers_loads(tiny_sdxl_base, tmp_path, monkeypatch):
    """Full-size SDXL does not fit twice in memory: --compare-order sequential closes our pipeline before each
    diffusers worker starts, and the next configuration loads ours again."""
    from edgediff import Pipeline
    from edgediff.bench import compare

    events = []
    real_close, real_worker = Pipeline.close, compare.DiffusersWorker.__init__
    monkeypatch.setattr(Pipeline, "close", lambda self: (events.append("close ours"), real_close(self))[1])
    monkeypatch.setattr(compare.DiffusersWorker, "__init__",
                        lambda self, *a, **k: (events.append("start theirs"), real_worker(self, *a, **k))[1])
    r = bench("sweep", tiny_sdxl_base.bundle, "--size", "16x16,32x32", *FAST, "--compare", "diffusers",
              "--compare-order", "sequential", "--json", tmp_path / "q.json")
    assert r.exit_code == 0, r.output
    assert events == ["close ours", "start theirs"] * 2
    rows = results(tmp_path / "q.json")
    assert [x["compare"]["order"] for x in rows] == ["sequential"] * 2
    assert all(x["load_seconds"] > 0 for x in rows)  # reloaded for the second size, not NaN ("loaded before")


def test_like_for_like_check_refuses_different_work():
    from edgediff.bench.compare import check_like_for_like
    from edgediff.errors import BackendError

    ours = {"timesteps": [999.0], "unet_batch": [1]}
    theirs = {"timesteps": [999.0], "unet_batch": [1], "unet_calls": 1, "scheduler_class": "EulerDiscreteScheduler"}
    check_like_for_like(ours, theirs, 1)
    for other in ({"timesteps": [1.0]}, {"unet_batch": [2]}, {"unet_calls": 2}, {"timesteps": [999.0, 1.0]}):
        with pytest.raises(BackendError, match="did not run the same computation"):
            check_like_for_like(ours, {**theirs, **other}, 1)


def test_refiner_is_refused_before_anything_loads(tiny_sdxl_refiner, monkeypatch):
    from edgediff import Pipeline

    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded before the refusal"))
    for extra in ((), ("--compare", "diffusers")):
        r = bench(tiny_sdxl_refiner.bundle, *FAST, *extra)
        assert r.exit_code == 2 and "refines images and bench times text-to-image" in r.output, r.output
        assert "internal error" not in r.output and "Traceback" not in r.output


def test_reference_that_is_not_an_sdxl_pipeline_is_refused_before_measuring(tiny_sdxl_base, tiny_sd1_source,
                                                                            monkeypatch):
    """An SD folder as the reference of an SDXL bundle: diffusers loaded it as an SDXL pipeline with no second
    tokenizer and failed in the first run ("'NoneType' object has no attribute 'tokenize'"), after ours was measured."""
    monkeypatch.setattr("edgediff.bench.sweep.measure", lambda *a, **k: pytest.fail("measured before the refusal"))
    r = bench(tiny_sdxl_base.bundle, *FAST, "--compare", "diffusers", "--reference", tiny_sd1_source)
    assert r.exit_code == 2, r.output
    assert "cannot run as the StableDiffusionXLPipeline this sdxl bundle compares with" in r.output
    assert "no tokenizer_2, text_encoder_2 (it is a StableDiffusionPipeline)" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_reference_that_fails_to_load_is_one_line(tiny_sdxl_base, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_sdxl_base.source, ref)
    for weights in (ref / "unet").glob("*.safetensors"):
        weights.unlink()
    r = bench(tiny_sdxl_base.bundle, *FAST, "--compare", "diffusers", "--reference", ref)
    assert r.exit_code == 2 and "the diffusers reference process failed to start:" in r.output, r.output
    assert "internal error" not in r.output and len(r.output.strip().splitlines()) == 1
