"""LCM-LoRA: a plain SD bundle + an LCM-LoRA-shaped LoRA + ``preset="lcm"`` (scheduler lcm over the bundle's own
training schedule, 4 steps, guidance 1.0), against diffusers' recipe for it: StableDiffusionPipeline with
``LCMScheduler.from_config(pipe.scheduler.config)``, ``load_lora_weights`` + ``fuse_lora``, 4 steps, guidance 1.0.

The LoRA is random but shaped as latent-consistency/lcm-lora-sdv1-5 (UNet only; the target modules of diffusers'
train_lcm_distill_lora_sd_wds.py: attention, feed-forward, resnet convolutions and shortcuts, the time embedding
projections, the down/upsamplers), in diffusers/PEFT and in kohya's format. Tolerance: images within 1e-3.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import InputError

from lora_fixtures import make_lora, to_kohya  # noqa: E402
from streams import StreamFrom, assert_images_close  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
PROMPT = "a red circle on white"
LATENTS = np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@pytest.fixture(scope="module")
def lcm_lora(tiny_sd1_source, tmp_path_factory):
    d = tmp_path_factory.mktemp("lcm-lora")
    peft = make_lora(tiny_sd1_source, d / "lcm-lora.safetensors", seed=5, rank=4, alpha=4.0, text_encoder=False,
                     magnitude=0.2, unet_targets=LCM_LORA_TARGETS)
    return {"peft": peft, "kohya": to_kohya(peft, d / "lcm-lora-kohya.safetensors")}


def reference_images(source, lora, steps: int = 4, guidance: float = 1.0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                                  requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(LATENTS),
                generator=torch.Generator().manual_seed(2), output_type="np").images


@pytest.fixture(scope="module")
def theirs(tiny_sd1_source, lcm_lora):
    return reference_images(tiny_sd1_source, lcm_lora["peft"])


def preset_images(pipe, **kw):
    return pipe(PROMPT, preset="lcm", latents=LATENTS, rng=StreamFrom(2), output_type="np", **kw)


def test_fused_at_export_matches_diffusers(tiny_sd1_source, lcm_lora, theirs, tmp_path):
    from edgediff.export.pipeline_export import export_pipeline

    out = export_pipeline(tiny_sd1_source, tmp_path / "fused", loras={lcm_lora["peft"]: 1.0})
    with Pipeline.load(out) as pipe:
        assert pipe.bundle.manifest.family == "sd1"  # a plain SD bundle: the preset does the rest
        r = preset_images(pipe)
    assert_images_close(r.images, theirs, TOL)
    assert (r.parameters["scheduler"], r.parameters["steps"], r.parameters["guidance_scale"]) == ("lcm", 4, 1.0)
    assert len([s for s in r.spans if s.name == "unet"]) == 4  # guidance 1.0: one UNet batch per step


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_hot_swapped_matches_diffusers(tiny_sd1_bundle, lcm_lora, theirs, fmt):
    with Pipeline.load(tiny_sd1_bundle, loras={str(lcm_lora[fmt]): 1.0}) as pipe:
        r = preset_images(pipe)
        assert_images_close(r.images, theirs, TOL)
        pipe.set_loras({})  # without the LoRA the same call gives another image: the LoRA is what is compared
        plain = preset_images(pipe)
    assert np.abs(np.asarray(plain.images[0]) - np.asarray(r.images[0])).max() > 0.01


def test_explicit_values_override_the_preset(tiny_sd1_source, tiny_sd1_bundle, lcm_lora):
    """--steps/--guidance/--scheduler given with the preset win; the rest still come from it (here: guidance 1.5
    runs classifier-free guidance with the LCM scheduler, as diffusers does for LCM-LoRA at that scale)."""
    theirs = reference_images(tiny_sd1_source, lcm_lora["peft"], steps=2, guidance=1.5)
    with Pipeline.load(tiny_sd1_bundle, loras={str(lcm_lora["peft"]): 1.0}) as pipe:
        r = preset_images(pipe, num_inference_steps=2, guidance_scale=1.5)
        assert_images_close(r.images, theirs, TOL)
        assert (r.parameters["scheduler"], r.parameters["steps"]) == ("lcm", 2)
        req = pipe.request(PROMPT, preset="lcm", scheduler="euler")
        assert (req.scheduler, req.steps, req.guidance_scale) == ("euler", 4, 1.0)


def test_preset_bad_input_is_one_line(tiny_sd1_bundle, tiny_sd2v_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        with pytest.raises(InputError, match="preset='turbo' is not a preset; presets: lcm: scheduler lcm, 4 steps"):
            pipe.request(PROMPT, preset="turbo")
        # LCM's steps come from the 50-step distillation schedule (original_inference_steps)
        with pytest.raises(InputError, match="exceed the 50 steps this model was distilled with"):
            pipe.request(PROMPT, preset="lcm", num_inference_steps=51)
    with Pipeline.load(tiny_sd2v_bundle) as pipe:
        with pytest.raises(InputError, match="preset 'lcm' does not apply to this sd2-v bundle"):
            pipe.request(PROMPT, preset="lcm")


def test_cli_lora_with_preset(tiny_sd1_bundle, lcm_lora, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from edgediff.cli import main

    runner = CliRunner()
    out = tmp_path / "lcm.png"
    r = runner.invoke(main, ["generate", PROMPT, "-m", str(tiny_sd1_bundle), "-o", str(out), "--seed", "1",
                             "--lora", f"{lcm_lora['kohya']}:1.0", "--preset", "lcm"])
    assert r.exit_code == 0, r.output
    params = json.loads(Image.open(out).text["parameters"])
    assert (params["scheduler"], params["steps"], params["guidance_scale"]) == ("lcm", 4, 1.0)
    assert params["loras"] == {str(lcm_lora["kohya"]): 1.0}
    # --scheduler and --steps given with the preset win over it; its guidance still applies
    r = runner.invoke(main, ["generate", PROMPT, "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "e.png"),
                             "--preset", "lcm", "--scheduler", "euler", "--steps", "3"])
    assert r.exit_code == 0, r.output
    params = json.loads(Image.open(tmp_path / "e.png").text["parameters"])
    assert (params["scheduler"], params["steps"], params["guidance_scale"]) == ("euler", 3, 1.0)
    r = runner.invoke(main, ["generate", PROMPT, "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "x.png"),
                             "--preset", "fast"])
    assert r.exit_code not in (0, 70) and "is not a preset" in r.output and len(r.output.strip().splitlines()) == 1
    help_text = runner.invoke(main, ["generate", "--help"]).output
    assert "--preset" in help_text and "4 steps, guidance 1.0" in help_text


def test_sdxl_lcm_lora_with_the_preset_matches_diffusers(tiny_sdxl_base, tmp_path):
    """SDXL's LCM-LoRA recipe (latent-consistency/lcm-lora-sdxl): StableDiffusionXLPipeline + LCMScheduler from its
    config + the fused LoRA, 4 steps, guidance 1.0 — ours with the LoRA applied at run time and preset="lcm"."""
    lora = make_lora(tiny_sdxl_base.source, tmp_path / "lcm-lora-sdxl.safetensors", seed=6, rank=4, alpha=4.0,
                     text_encoder=False, magnitude=0.2, unet_targets=LCM_LORA_TARGETS)
    latents = np.random.default_rng(10).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_base.source, local_files_only=True)
        ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
        ref.load_lora_weights(str(lora))
        ref.fuse_lora()
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=torch.from_numpy(latents),
                 generator=torch.Generator().manual_seed(2), output_type="np").images
    with Pipeline.load(tiny_sdxl_base.bundle, loras={str(lora): 1.0}) as pipe:
        mine = pipe(PROMPT, preset="lcm", latents=latents, rng=StreamFrom(2), output_type="np")
    assert_images_close(mine.images, theirs, TOL)
    assert (mine.parameters["scheduler"], mine.parameters["steps"], mine.parameters["guidance_scale"]) == ("lcm", 4, 1.0)


def test_img2img_with_the_preset_matches_diffusers(tiny_sd1_source, tiny_sd1_bundle, lcm_lora):
    """LCM-LoRA img2img is SD's img2img with the LCM scheduler (diffusers' StableDiffusionImg2ImgPipeline +
    LCMScheduler: the first (1 - strength) of the 4-step schedule skipped), not the LCM family's."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
            tiny_sd1_source, safety_checker=None, requires_safety_checker=False, local_files_only=True)
        ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
        ref.load_lora_weights(str(lcm_lora["peft"]))
        ref.fuse_lora()
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=init, strength=0.6, num_inference_steps=4, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(21), output_type="np").images
    with Pipeline.load(tiny_sd1_bundle, loras={str(lcm_lora["peft"]): 1.0}) as pipe:
        mine = pipe(PROMPT, image=init, strength=0.6, preset="lcm", rng=StreamFrom(21), output_type="np")
    assert_images_close(mine.images, theirs, TOL)
    assert len([s for s in mine.spans if s.name == "unet"]) == 2  # int(4 * 0.6) of the 4 steps
