"""diffusers LatentConsistencyModelPipeline -> ONNX bundle: the UNet's extra ``timestep_cond`` input (optimum's name
and axes), its parity receipt, family ``lcm`` with LatentConsistencyModelPipeline's defaults recorded (4 steps,
guidance 8.5) unless export names others, the LCM scheduler kept, and the SDXL-LCM UNet refused before any weight
loads. Reference: diffusers 0.42 on the tiny random LCM (export/random_lcm.py); graphs vs PyTorch at 1e-4."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgediff.bundle.manifest import GenerationDefaults, Manifest
from edgediff.bundle.reader import Bundle
from edgediff.errors import ExportError

pytest.importorskip("diffusers")


def test_lcm_bundle_has_the_guidance_embedding_input_and_passing_receipts(tiny_lcm_source, tiny_lcm_bundle):
    b = Bundle.open(tiny_lcm_bundle)
    m = b.manifest
    assert m.family == "lcm" and m.prediction_type == "epsilon"
    assert m.defaults == GenerationDefaults(steps=4, guidance_scale=8.5)
    unet = m.components["unet"]
    assert [s.name for s in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet.input("timestep_cond").shape == ("batch", 24)  # time_cond_proj_dim of the tiny LCM
    for comp in m.components.values():
        assert comp.parity is not None and comp.parity.passed and comp.parity.max_rel < 1e-4, (comp.name, comp.parity)
    assert unet.parity.inputs["timestep_cond"] == [1, 24]  # checked at batch 1, traced at 2: a dynamic batch axis
    assert b.config("scheduler/scheduler_config.json")["_class_name"] == "LCMScheduler"
    assert json.loads((tiny_lcm_source / "model_index.json").read_text())["_class_name"] == \
        "LatentConsistencyModelPipeline"
    assert b.verify() == [] and Manifest.from_json(m.to_json()) == m


def test_export_defaults_given_win_over_the_lcm_ones():
    from edgediff.export.components_lcm import recommended_defaults

    assert recommended_defaults("lcm", GenerationDefaults(steps=6)) == GenerationDefaults(6, 8.5)
    assert recommended_defaults("lcm", GenerationDefaults(guidance_scale=1.5)) == GenerationDefaults(4, 1.5)
    assert recommended_defaults("sd1", GenerationDefaults()) == GenerationDefaults()


def _sdxl_lcm_source(root):
    """A config-only SDXL pipeline folder whose UNet has time_cond_proj_dim (latent-consistency/lcm-sdxl's shape):
    the refusal must come from the configs, before any weight is read (the weight files are empty)."""
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "LCMScheduler"]}
    configs = {
        "text_encoder": dict(hidden_size=32, num_hidden_layers=2, max_position_embeddings=77),
        "text_encoder_2": dict(hidden_size=48, num_hidden_layers=2, max_position_embeddings=77, projection_dim=24),
        "unet": dict(sample_size=8, block_out_channels=[32, 64], addition_embed_type="text_time",
                     time_cond_proj_dim=256, cross_attention_dim=80),
        "vae": dict(block_out_channels=[32, 64], latent_channels=4),
    }
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for name, cfg in configs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        (root / name / "model.safetensors").write_bytes(b"")
    for tok in ("tokenizer", "tokenizer_2"):
        (root / tok).mkdir()
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    return root


def test_an_lcm_distilled_sdxl_unet_is_refused_in_one_line(tmp_path):
    from edgediff.cli import main
    from edgediff.export.plan import export_plan
    from edgediff.export.source import inspect_source

    src = _sdxl_lcm_source(tmp_path / "lcm-sdxl")
    with pytest.raises(ExportError, match="LCM-distilled SDXL.*LCM-LoRA and --preset lcm"):
        export_plan(inspect_source(src))
    r = CliRunner().invoke(main, ["export", str(src), str(tmp_path / "out")])
    assert r.exit_code not in (0, 70) and "LCM-distilled SDXL" in r.output, r.output
    lines = r.output.strip().splitlines()  # the progress line "exporting SRC -> OUT", then the one error line
    assert lines[0].startswith("exporting") and len(lines) == 2 and "LCM-distilled SDXL" in lines[1]
    assert not (tmp_path / "out").exists()
