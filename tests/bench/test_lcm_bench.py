"""``edgediff bench`` on an LCM bundle (the tiny random LCM, exported once a session): its recorded 4 steps and
guidance run one UNet batch per step, and ``--compare diffusers`` runs diffusers' LatentConsistencyModelPipeline like
for like (same LCM timesteps, same batch). Fast settings: one run, no warm-up."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgediff.cli import main


def test_lcm_bundle_benches_and_compares_with_its_diffusers_pipeline(tiny_lcm_source, tiny_lcm_bundle, tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "lcm.json"
    r = CliRunner().invoke(main, ["bench", "run", str(tiny_lcm_bundle), "--runs", "1", "--warmup", "0", "--compare",
                                  "diffusers", "--reference", str(tiny_lcm_source), "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "LatentConsistencyModelPipeline" in r.output
    assert "both ran lcm (LCMScheduler" in r.output and "timesteps [999, 759, 499, 259], UNet batch 1" in r.output
    row = json.loads(out.read_text())["results"][0]
    assert row["config"]["steps"] == 4
