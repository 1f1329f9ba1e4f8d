"""Latent Consistency Models: parity with diffusers' LatentConsistencyModelPipeline on a tiny random LCM (tiny-sd1
with a time_cond_proj_dim UNet and LCMScheduler), and the refusals of what an LCM bundle cannot do.

Reference: diffusers (installed version) LatentConsistencyModelPipeline with output_type="np", the same initial
latents, and its scheduler's noise stream (LCM re-noises between steps: tests/streams.py). Tolerance: max abs
difference of the images <= 1e-3 (pixels in [0, 1]).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import InputError
from edgediff.families.lcm import guidance_embedding

from streams import StreamFrom, assert_images_close  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
PROMPTS = ["a red circle on white", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def reference(tiny_lcm_source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
            tiny_lcm_source, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_lcm_bundle):
    with Pipeline.load(tiny_lcm_bundle) as pipe:
        yield pipe


@pytest.mark.parametrize("dim", [24, 256, 25])
def test_guidance_embedding_matches_diffusers(dim):
    """The w-embedding at the w values LCMs are used with (w = guidance - 1, 0 to ~15), odd sizes zero-padded.
    Exact to float32 rounding (2e-6) wherever torch's frequency is the IEEE one. torch's float32 exp is faithfully,
    not correctly, rounded: a few frequencies are 1 ulp off, and 1000 w carries that into the angle, so there the
    bound is the angles' own difference (what the sinusoid can move by) — checked to be that ulp and nothing else."""
    w = np.array([0.0, 0.5, 1.0, 3.0, 7.5, 14.0], np.float32)
    theirs = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w), embedding_dim=dim).numpy()
    mine = guidance_embedding(w, dim)
    assert mine.shape == theirs.shape == (len(w), dim) and mine.dtype == np.float32
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    args = (torch.arange(half, dtype=torch.float32) * -step).numpy()  # (half,) float32, bit-equal in both
    torch_freqs = torch.exp(torch.from_numpy(args)).numpy()
    ieee_freqs = np.exp(args.astype(np.float64)).astype(np.float32)
    off = torch_freqs != ieee_freqs
    assert (np.abs(torch_freqs - ieee_freqs)[off] <= np.spacing(ieee_freqs)[off]).all()  # 1 ulp at most
    w1000 = w * np.float32(1000.0)
    moved = np.abs(w1000[:, None] * torch_freqs[None, :] - w1000[:, None] * ieee_freqs[None, :])  # (N, half) f32
    bound = np.concatenate([moved, moved] + ([np.zeros((len(w), 1), np.float32)] if dim % 2 else []), axis=1)
    err = np.abs(mine - theirs)
    assert (err <= bound + 2e-6).all(), f"max excess {float((err - bound).max()):.2e}"
    # and the whole bound: one ulp of a frequency below 1 (<= 2^-24) at 1000 w = 14000 moves an angle by <= 8.3e-4
    assert err.max() < 14000 * 2.0**-24 + 2e-6 and np.mean(err <= 2e-6) > 0.9


def test_bundle_is_an_lcm_with_its_defaults(ours):
    """Family lcm, LCMScheduler by default, 4 steps and guidance 8.5 (LatentConsistencyModelPipeline's), and the
    UNet's timestep_cond input sized by time_cond_proj_dim."""
    m = ours.bundle.manifest
    assert m.family == "lcm" and ours.default_scheduler == "lcm"
    assert (ours.default_steps, ours.default_guidance) == (4, 8.5)
    assert m.components["unet"].input("timestep_cond").shape == ("batch", 24)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("guidance", [8.5, 2.0])
def test_txt2img_matches_diffusers(reference, ours, steps, guidance):
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
    theirs = reference(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                       generator=torch.Generator().manual_seed(11), output_type="np").images
    mine = ours(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, rng=StreamFrom(11),
                output_type="np")
    assert_images_close(mine.images, theirs, TOL)
    # one UNet batch of the images per step: no classifier-free guidance branch
    assert len([s for s in mine.spans if s.name == "unet"]) == steps
    assert mine.parameters["scheduler"] == "lcm" and mine.parameters["negative_prompt"] is None


def test_defaults_and_several_images_per_prompt_match_diffusers(reference, ours):
    """No steps or guidance given: both run 4 steps at guidance 8.5; two images per prompt share its embedding."""
    latents = np.random.default_rng(4).standard_normal((4, 4, 8, 8)).astype(np.float32)
    theirs = reference(PROMPTS, num_images_per_prompt=2, latents=torch.from_numpy(latents),
                       generator=torch.Generator().manual_seed(5), output_type="np").images
    mine = ours(PROMPTS, num_images_per_prompt=2, latents=latents, rng=StreamFrom(5), output_type="np")
    assert_images_close(mine.images, theirs, TOL)
    assert (mine.parameters["steps"], mine.parameters["guidance_scale"]) == (4, 8.5)


@pytest.fixture(scope="module")
def reference_img2img(tiny_lcm_source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
            tiny_lcm_source, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("steps,strength", [(4, 0.8), (2, 0.5), (1, 0.3), (8, 0.6), (4, 1.0)])
def test_img2img_matches_diffusers(reference_img2img, ours, steps, strength):
    """LatentConsistencyModelImg2ImgPipeline: every step runs, on timesteps inside the first int(50 * strength) of
    the distillation schedule; the image's latents sampled and noised with the call's stream."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    theirs = reference_img2img(PROMPTS[0], image=init, strength=strength, num_inference_steps=steps,
                               guidance_scale=6.0, generator=torch.Generator().manual_seed(21), output_type="np").images
    mine = ours(PROMPTS[0], image=init, strength=strength, num_inference_steps=steps, guidance_scale=6.0,
                rng=StreamFrom(21), output_type="np")
    assert_images_close(mine.images, theirs, TOL)
    assert len([s for s in mine.spans if s.name == "unet"]) == steps  # all of them, none skipped


def test_guidance_reaches_the_unet(ours):
    """The guidance scale is the model's w input: another scale gives another image (and a real one each)."""
    latents = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    a, b = (np.asarray(ours("a cat", guidance_scale=g, latents=latents, seed=1, output_type="np").images[0])
            for g in (1.0, 8.5))
    assert np.abs(a - b).max() > 0.01


def test_the_unet_is_fed_the_embedding_of_the_call(ours):
    """The step's feeds carry (N, time_cond_proj_dim) w-embeddings, one row per image, of guidance_scale - 1."""
    req = ours.request(["a cat", "a dog"], guidance_scale=3.0, num_images_per_prompt=2, seed=0)
    job = ours.start(req)
    feeds = job.unet_feeds()
    assert feeds["sample"].shape[0] == 4 and feeds["timestep_cond"].shape == (4, 24)
    np.testing.assert_array_equal(feeds["timestep_cond"], guidance_embedding(np.full((4,), 2.0, np.float32), 24))


def test_bad_input_is_refused_in_one_line(ours):
    with pytest.raises(InputError, match="negative_prompt does not apply to this lcm bundle"):
        ours.request("a cat", negative_prompt="blurry")
    with pytest.raises(InputError, match="exceed the 50 steps this model was distilled with"):
        ours.request("a cat", num_inference_steps=51)
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    # LCM img2img picks its steps from the first int(50 * strength) distillation timesteps: 16 > int(50 * 0.3)
    with pytest.raises(InputError, match="16 steps with strength 0.3 exceed the 15 timesteps"):
        ours.request("a cat", image=image, strength=0.3, num_inference_steps=16)
    with pytest.raises(InputError, match="img2img with an lcm bundle runs the lcm scheduler"):
        ours.request("a cat", image=image, scheduler="euler")
    ours.request("a cat", image=image, strength=0.3, num_inference_steps=15)
    with pytest.raises(InputError, match="inpainting is not supported for lcm bundles"):
        ours.request("a cat", image=image, mask_image=Image.new("L", (16, 16), 255))
    with pytest.raises(InputError, match="is a Latent Consistency Model already"):
        ours.request("a cat", preset="lcm")
    with pytest.raises(InputError, match="prompt_2= does not apply to this lcm bundle"):
        ours.request("a cat", prompt_2="a dog")
    ours.request("a cat", num_inference_steps=50)  # the most the distillation schedule allows still runs
    assert ours.request("a cat", negative_prompt="").negatives is None  # an empty field asks for nothing


def test_cli_generates_and_refuses_in_one_line(tiny_lcm_bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    runner = CliRunner()
    out = tmp_path / "lcm.png"
    r = runner.invoke(main, ["generate", "a red circle", "-m", str(tiny_lcm_bundle), "-o", str(out), "--seed", "3"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(out).size == (16, 16)
    for args, text in ((["--negative", "blurry"], "negative_prompt does not apply"),
                       (["--steps", "60"], "exceed the 50 steps"),
                       (["--preset", "lcm"], "Latent Consistency Model already")):
        r = runner.invoke(main, ["generate", "a cat", "-m", str(tiny_lcm_bundle), "-o", str(tmp_path / "x.png"), *args])
        assert r.exit_code not in (0, 70) and text in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x.png").exists()


def test_an_lcm_unet_in_another_familys_bundle_is_refused_when_opened(tiny_lcm_bundle, tmp_path):
    """optimum describes an LCM-distilled SDXL as sdxl: its UNet's timestep_cond would go unfed. Here the tiny LCM
    bundle relabelled sd1 stands for it."""
    import dataclasses
    import shutil

    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest
    from edgediff.errors import BundleError

    other = tmp_path / "relabelled"
    shutil.copytree(tiny_lcm_bundle, other)
    write_manifest(other, dataclasses.replace(Bundle.open(tiny_lcm_bundle).manifest, family="sd1"))
    with pytest.raises(BundleError, match="sd1 bundle's unet takes 'timestep_cond', a guidance embedding"):
        Pipeline.load(other)


def test_step_level_batching_keeps_each_jobs_guidance_embedding(ours):
    """The server's step-level batching (runtime/batching.py) concatenates jobs' feeds: each LCM job keeps its own
    w-embedding rows, steps and noise, and its image is the one it gets alone, to the bit."""
    from edgediff.batching import step_together

    kws = [dict(prompt="a cat", guidance_scale=8.5, num_inference_steps=4, seed=1),
           dict(prompt=["a dog", "a fox"], guidance_scale=1.0, num_inference_steps=2, seed=2),
           dict(prompt="a red circle", guidance_scale=4.0, num_inference_steps=8, seed=3)]
    alone = [np.stack(ours(output_type="np", **kw).images) for kw in kws]
    rows = []

    def run(graph, feeds):
        rows.append(feeds["timestep_cond"].shape[0])
        return ours.run_denoiser(graph, feeds)

    jobs = [ours.start(ours.request(output_type="np", **kw)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, run)
    for job, image in zip(jobs, alone):
        np.testing.assert_array_equal(np.stack(ours.finish(job).images), image)
    assert rows[0] == 4 and len(rows) == 8  # the first steps shared one call of all four images
