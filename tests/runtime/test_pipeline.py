"""Whole-pipeline parity with diffusers: same weights (the tiny fixtures), same initial latents, same noise.

Reference: diffusers StableDiffusionPipeline / StableDiffusionImg2ImgPipeline (installed version) with
output_type="np". Tolerance: max abs difference of the images <= 1e-3 (pixels in [0, 1]).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline

from streams import StreamFrom, assert_images_close  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
           "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
           "lcm": "LCMScheduler", "unipc": "UniPCMultistepScheduler"}


def reference_pipeline(source, scheduler: str, img2img: bool = False):
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(source, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    extra = {"use_karras_sigmas": True} if scheduler == "dpmpp_2m_karras" else {}
    extra.update({"skip_prk_steps": True} if scheduler == "pndm" else {})
    pipe.scheduler = getattr(diffusers, CLASSES[scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours_sd1(tiny_sd1_bundle):
    return Pipeline.load(tiny_sd1_bundle)


@pytest.fixture(scope="module")
def ours_sd2v(tiny_sd2v_bundle):
    return Pipeline.load(tiny_sd2v_bundle)


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)


CASES = [  # (scheduler, guidance, negative prompt, steps)
    ("euler", 7.5, None, 4), ("euler_a", 7.5, "blurry", 4), ("dpmpp_2m_karras", 5.0, None, 6),
    ("ddim", 1.0, None, 4), ("pndm", 7.5, "low quality", 5), ("lcm", 1.0, None, 4), ("unipc", 7.5, None, 5),
]


@pytest.mark.parametrize("fixture", ["sd1", "sd2v"])
@pytest.mark.parametrize("scheduler,guidance,negative,steps", CASES)
def test_txt2img_matches_diffusers(fixture, scheduler, guidance, negative, steps, request):
    source = request.getfixturevalue(f"tiny_{fixture}_source")
    ours = request.getfixturevalue(f"ours_{fixture}")
    ref = reference_pipeline(source, scheduler)
    latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)  # 2 prompts x 1 image
    prompts = ["a red circle on white", "an astronaut riding a horse"]
    gen = torch.Generator().manual_seed(11)
    theirs = ref(prompts, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=steps,
                 guidance_scale=guidance, latents=torch.from_numpy(latents), generator=gen, output_type="np").images
    mine = ours(prompts, negative, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                scheduler=scheduler, rng=StreamFrom(11), output_type="np")
    compare(mine.images, theirs)


def test_sd_turbo_style_one_trailing_step_without_guidance_matches_diffusers(tiny_sd1_source, tiny_sd1_bundle,
                                                                           tmp_path):
    """SD-Turbo's recipe (SD 2.1 architecture): Euler ancestral, trailing timesteps, 1 step, guidance 0 — one UNet
    batch per step, and the trailing schedule's single timestep (999) honoured from the bundle's config."""
    from bundle_edit import with_scheduler_config

    ref = reference_pipeline(tiny_sd1_source, "euler_a")
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config,
                                                                          timestep_spacing="trailing")
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    theirs = ref("a red circle", num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents),
                 generator=torch.Generator().manual_seed(4), output_type="np").images
    turbo = with_scheduler_config(tiny_sd1_bundle, tmp_path / "turbo", _class_name="EulerAncestralDiscreteScheduler",
                                  timestep_spacing="trailing")
    with Pipeline.load(turbo) as pipe:
        mine = pipe("a red circle", num_inference_steps=1, guidance_scale=0.0, latents=latents, rng=StreamFrom(4),
                    output_type="np")
    compare(mine.images, theirs)
    unet = [s for s in mine.spans if s.name == "unet"]
    assert len(unet) == 1


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m_karras", "euler_a"])
def test_img2img_matches_diffusers(tiny_sd1_source, ours_sd1, scheduler):
    from PIL import Image

    ref = reference_pipeline(tiny_sd1_source, scheduler, img2img=True)
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    gen = torch.Generator().manual_seed(21)
    theirs = ref("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                 generator=gen, output_type="np").images
    mine = ours_sd1("a blue square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=6.0,
                    seed=21, rng="torch", scheduler=scheduler, output_type="np")
    compare(mine.images, theirs)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 8, 8), (1, 4, 13, 7), (3, 4, 9, 9)])
def test_torch_rng_reproduces_diffusers_initial_latents(shape):
    """rng="torch": the latents diffusers draws with one torch.Generator per image, within float32 rounding."""
    from diffusers.utils.torch_utils import randn_tensor

    from edgediff.noise import TorchNoise

    seeds = [7 + k for k in range(shape[0])]
    theirs = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in seeds]).numpy()
    ours = TorchNoise(seeds).standard_normal(shape)
    # the uniform stream is bit-exact; the Box-Muller transform differs from torch's SLEEF kernels by <= 3 ulp
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(theirs).max())
    assert np.mean(ours == theirs) > 0.85


def test_seed_reproduces_and_images_are_independent_of_batch(ours_sd1):
    a = ours_sd1("a cat", num_inference_steps=3, seed=100, num_images_per_prompt=3, output_type="np")
    b = ours_sd1("a cat", num_inference_steps=3, seed=101, output_type="np")
    assert a.seeds == (100, 101, 102)
    np.testing.assert_array_equal(a.images[1], b.images[0])


def test_result_contract(ours_sd1):
    r = ours_sd1("a cat", num_inference_steps=2, seed=1, scheduler="euler")
    assert r.images[0].size == (16, 16) and r.images[0].mode == "RGB"
    assert {"tokenize", "text_encoder", "unet", "scheduler", "vae_decode", "total"} <= set(r.timings)
    assert len([s for s in r.spans if s.name == "unet"]) == 2


def test_autoencode_matches_diffusers_vae_round_trip(tiny_sd1_source, ours_sd1):
    """encoder mean -> decoder, as diffusers' AutoencoderKL computes it, to uint8 like the pipelines' images."""
    from edgediff.errors import InputError

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_sd1_source / "vae", local_files_only=True)
    images = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        theirs = vae.decode(vae.encode(x).latent_dist.mean).sample
    theirs = ((theirs / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
    mine = ours_sd1.autoencode(images)
    assert mine.shape == images.shape and mine.dtype == np.uint8
    assert np.max(np.abs(mine.astype(np.float64) - theirs)) <= 1  # float32 rounding at .5 may flip one level
    assert mine.std() > 1  # the comparison means something

    for bad in (images[0], images.astype(np.float32), images[:, :15], images[:0]):
        with pytest.raises(InputError, match="autoencode takes|multiples of"):
            ours_sd1.autoencode(bad)
