"""``edgediff bench`` on SD3 bundles (the tiny random SD3 pipelines of tests/sdxl_fixtures.py): the denoiser's bytes
and timings are the transformer's, and ``--compare diffusers`` runs StableDiffusion3Pipeline like for like (the same
flow-matching timesteps and transformer batch, checked), a folder without T5 loaded as diffusers loads it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main

FAST = ("--steps", "2", "--runs", "1", "--warmup", "0")


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


@pytest.mark.parametrize("fixture", ["tiny_sd3", "tiny_sd3_no_t5"])
def test_compare_runs_diffusers_sd3_pipeline_like_for_like(request, fixture, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    built = request.getfixturevalue(fixture)
    r = bench(built.bundle, *FAST, "--compare", "diffusers", "--json", tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    jsonschema.validate(doc, json.loads((Path(__file__).parents[2] / "bench" / "schema.json").read_text()))
    row = doc["results"][0]
    assert row["variant"]["unet_bytes"] > 0 and row["variant"]["precision"]["transformer"] == "fp32"
    assert row["stages"]["unet"]["n"] == 2  # the transformer's calls, under the span the bench reads
    cmp = row["compare"]
    assert cmp["reference"]["pipeline"] == "StableDiffusion3Pipeline"
    comp = cmp["computation"]
    assert comp["scheduler"] == "flow_euler" and comp["diffusers_scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert comp["unet_batch"] == [2] and len(comp["timesteps"]) == 2 and comp["timesteps"][0] == 1000.0
    for key in ("text_encoder", "unet_per_call", "vae_decode", "total"):
        assert cmp["theirs"][key] > 0 and cmp["ratio"][key] > 0, key
