"""CFG cutoff (runtime/cfg_cutoff.py): guidance for the first part of the schedule, then conditional-only steps.

Reference: diffusers StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with
``callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=r)`` and StableDiffusionXLPipeline with
SDXLCFGCutoffCallback (installed version), same initial latents and noise. Tolerance: max abs <= 1e-3 on float
images in [0, 1]. One image per call: diffusers' callback keeps ``prompt_embeds[-1:]``, the conditional row of a
single image only.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.cfg_cutoff import CFGCutoff, check_cutoff
from edgediff.cli import main
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from streams import StreamFrom, assert_images_close  # noqa: E402

TOL = 1e-3
SD_CLASSES = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
              "ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


def reference(source, cls: str, scheduler: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, cls).from_pretrained(source, local_files_only=True, **kw)
    extra = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    pipe.scheduler = getattr(diffusers, SD_CLASSES[scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)


@pytest.fixture(scope="module")
def ours_sd1(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as p:
        yield p


def _sd_kw():
    return dict(safety_checker=None, requires_safety_checker=False)


def unet_batches(pipe, **kw) -> list[int]:
    """The denoiser batch of each step of a call, stepping its job by hand."""
    job = pipe.start(pipe.request(**kw))
    seen = []
    while not job.done:
        seen.append(job.batch)
        feeds = job.unet_feeds()
        assert feeds["sample"].shape[0] == job.batch == feeds["encoder_hidden_states"].shape[0]
        job.advance(pipe.run_denoiser(job.graph(), feeds))
    return seen


@pytest.mark.parametrize("scheduler,ratio,steps", [("euler", 0.5, 6), ("dpmpp_2m", 0.3, 5), ("pndm", 0.5, 5),
                                                   ("euler_a", 0.0, 4), ("ddim", 0.6, 5)])
def test_sd1_matches_diffusers_sd_cfg_cutoff_callback(tiny_sd1_source, ours_sd1, scheduler, ratio, steps):
    from diffusers.callbacks import SDCFGCutoffCallback

    ref = reference(tiny_sd1_source, "StableDiffusionPipeline", scheduler, **_sd_kw())
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    theirs = ref("a red circle on white", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=7.5,
                 latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(11), output_type="np",
                 callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=ratio)).images
    mine = ours_sd1("a red circle on white", "blurry", num_inference_steps=steps, guidance_scale=7.5, latents=latents,
                    scheduler=scheduler, rng=StreamFrom(11), output_type="np", cfg_cutoff=ratio)
    compare(mine.images, theirs)
    assert mine.parameters["cfg_cutoff"] == ratio
    plain = ours_sd1("a red circle on white", "blurry", num_inference_steps=steps, guidance_scale=7.5, latents=latents,
                     scheduler=scheduler, rng=StreamFrom(11), output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-4  # the cutoff changed the image


def test_guided_steps_are_the_ones_diffusers_guides(ours_sd1):
    """20 steps at 0.5: diffusers' callback fires at the end of step int(20 * 0.5) = 10, so 11 steps run the
    doubled batch and 9 the conditional rows alone; a 1.0 cutoff never fires."""
    kw = dict(prompt="a red circle", num_inference_steps=20, guidance_scale=7.5, seed=1, scheduler="euler")
    assert unet_batches(ours_sd1, cfg_cutoff=0.5, **kw) == [2] * 11 + [1] * 9
    assert unet_batches(ours_sd1, cfg_cutoff=0.0, **kw) == [2] + [1] * 19
    assert unet_batches(ours_sd1, cfg_cutoff=1.0, **kw) == [2] * 20
    two = dict(kw, prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    assert unet_batches(ours_sd1, cfg_cutoff=0.25, **two) == [8] * 6 + [4] * 14


def test_img2img_counts_steps_from_the_first_step_run(tiny_sd1_source, ours_sd1):
    """diffusers' num_timesteps is the steps img2img runs (strength 0.6 of 10 = 6), and the cutoff index counts
    from the first of them."""
    from diffusers.callbacks import SDCFGCutoffCallback
    from PIL import Image

    ref = reference(tiny_sd1_source, "StableDiffusionImg2ImgPipeline", "euler", **_sd_kw())
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    theirs = ref("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                 generator=torch.Generator().manual_seed(21), output_type="np",
                 callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images
    mine = ours_sd1("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0, seed=21,
                    rng="torch", scheduler="euler", output_type="np", cfg_cutoff=0.5)
    compare(mine.images, theirs)
    batches = unet_batches(ours_sd1, prompt="a blue square", image=init, strength=0.6, num_inference_steps=10,
                           guidance_scale=6.0, seed=21, scheduler="euler", cfg_cutoff=0.5)
    assert batches == [2] * 4 + [1] * 2


def test_sdxl_matches_diffusers_sdxl_cfg_cutoff_callback(tiny_sdxl_base):
    """SDXL also drops the unconditional halves of the pooled text embeddings and the time ids (the extra inputs)."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    ref = reference(tiny_sdxl_base.source, "StableDiffusionXLPipeline", "euler")
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    theirs = ref("an astronaut riding a horse", negative_prompt="ugly", num_inference_steps=5, guidance_scale=5.0,
                 latents=torch.from_numpy(latents), generator=torch.Generator().manual_seed(2), output_type="np",
                 callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.4)).images
    with Pipeline.load(tiny_sdxl_base.bundle) as ours:
        mine = ours("an astronaut riding a horse", "ugly", num_inference_steps=5, guidance_scale=5.0, latents=latents,
                    scheduler="euler", rng=StreamFrom(2), output_type="np", cfg_cutoff=0.4)
        compare(mine.images, theirs)
        job = ours.start(ours.request("x", num_inference_steps=5, guidance_scale=5.0, seed=0, cfg_cutoff=0.4))
        while job.cond.guided:
            job.advance(ours.run_denoiser(job.graph(), job.unet_feeds()))
        feeds = job.unet_feeds()
        assert {k: v.shape[0] for k, v in feeds.items()} == {"sample": 1, "timestep": 1, "encoder_hidden_states": 1,
                                                             "text_embeds": 1, "time_ids": 1}


def test_several_images_each_get_their_own_conditional_rows(ours_sd1):
    """With several images the conditional half of every input is kept (not diffusers' last row only): each image
    is the one it would be alone."""
    latents = np.random.default_rng(4).standard_normal((2, 4, 8, 8)).astype(np.float32)
    kw = dict(num_inference_steps=5, guidance_scale=7.5, scheduler="euler", output_type="np", cfg_cutoff=0.4)
    both = ours_sd1(["a red circle", "a blue square"], latents=latents, seed=[1, 2], **kw)
    for k, prompt in enumerate(["a red circle", "a blue square"]):
        alone = ours_sd1(prompt, latents=latents[k:k + 1], seed=[1, 2][k], **kw)
        assert np.abs(both.images[k] - alone.images[0]).max() <= 1e-5


def test_unguided_call_and_full_cutoff_are_unchanged(ours_sd1):
    kw = dict(num_inference_steps=4, seed=3, output_type="np")
    plain = ours_sd1("a red circle", guidance_scale=1.0, **kw).images[0]
    cut = ours_sd1("a red circle", guidance_scale=1.0, cfg_cutoff=0.5, **kw).images[0]
    assert np.array_equal(plain, cut)  # no unconditional half to drop: a no-op
    guided = ours_sd1("a red circle", guidance_scale=7.5, **kw).images[0]
    assert np.array_equal(guided, ours_sd1("a red circle", guidance_scale=7.5, cfg_cutoff=1.0, **kw).images[0])
    assert ours_sd1.start(ours_sd1.request("x", guidance_scale=1.0, cfg_cutoff=0.5)).extensions == ()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "half", True])
def test_cutoff_outside_0_1_is_refused(ours_sd1, bad):
    with pytest.raises(InputError, match="cfg_cutoff=.*must be a number from 0 to 1"):
        ours_sd1("x", num_inference_steps=2, cfg_cutoff=bad)


def test_check_cutoff_accepts_the_ends():
    assert check_cutoff(0) == 0.0 and check_cutoff(1) == 1.0 and check_cutoff(None) is None
    assert CFGCutoff(0.5).ratio == 0.5


def test_cli_cfg_cutoff(tiny_sd1_bundle, tmp_path):
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"),
                                  "--steps", "2", "--cfg-cutoff", "1.5"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: cfg_cutoff=1.5"), r.output
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "o.png"),
                                  "--steps", "3", "--cfg-cutoff", "0.5", "--seed", "1"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(tmp_path / "o.png") as im:
        assert json.loads(im.info["parameters"])["cfg_cutoff"] == 0.5
