"""``edgediff bench --compare diffusers`` on FLUX bundles (tests/sdxl_fixtures.py): FluxPipeline runs like for like —
the same dynamically shifted timesteps (mu from the image's token count, the pipeline's sigmas), the same
transformer batch (no CFG branch) and as many T5 tokens as ours encode (schnell 256, not FluxPipeline's 512)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgediff.cli import main


@pytest.mark.parametrize("fixture,length", [("tiny_flux_schnell", 256), ("tiny_flux_dev", 512)])
def test_compare_runs_flux_pipeline_like_for_like(request, fixture, length, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    built = request.getfixturevalue(fixture)
    r = CliRunner().invoke(main, ["bench", str(built.bundle), "--steps", "2", "--runs", "1", "--warmup", "0",
                                  "--size", "64x64", "--compare", "diffusers", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "c.json").read_text())
    jsonschema.validate(doc, json.loads((Path(__file__).parents[2] / "bench" / "schema.json").read_text()))
    cmp = doc["results"][0]["compare"]
    assert cmp["reference"]["pipeline"] == "FluxPipeline"
    comp = cmp["computation"]
    assert comp["scheduler"] == "flow_euler" and comp["unet_batch"] == [1]
    assert comp["max_sequence_length"] == length and len(comp["timesteps"]) == 2
    for key in ("unet_per_call", "total"):
        assert cmp["theirs"][key] > 0 and cmp["ratio"][key] > 0, key
