"""Whole SD3 pipelines against diffusers: the tiny random SD3 pipelines with and without T5 (tests/sdxl_fixtures.py),
exported and run by edgediff with the same initial latents and noise as diffusers' StableDiffusion3Pipeline /
StableDiffusion3Img2ImgPipeline (installed version). Tolerance: max abs <= 1e-3 on float images in [0, 1], and uint8
images within 2/255. Also: SD3's bad input (API and CLI), the step-level batching and no torch at generation."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.batching import step_together
from edgediff.errors import ConfigError, InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from no_torch import assert_generates_without_torch  # noqa: E402
from streams import StreamFrom, assert_images_close  # noqa: E402

TOL = 1e-3
LATENTS = np.random.default_rng(3).standard_normal((2, 16, 16, 16)).astype(np.float32)  # 2 images of 32x32
PROMPTS = ["a red circle on white", "an astronaut riding a horse"]


def reference(source, cls: str = "StableDiffusion3Pipeline", scheduler: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a T5-less folder (text_encoder_3 null): diffusers wants the absence said, as users load such a pipeline
        absent = {} if (source / "text_encoder_3").is_dir() else dict(text_encoder_3=None, tokenizer_3=None)
        pipe = getattr(diffusers, cls).from_pretrained(source, local_files_only=True, **absent)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)
    assert np.abs(np.round(np.stack(ours) * 255) - np.round(np.asarray(theirs) * 255)).max() <= 2  # 2/255 as uint8


@pytest.fixture(scope="module")
def ours(tiny_sd3):
    with Pipeline.load(tiny_sd3.bundle) as p:
        yield p


@pytest.fixture(scope="module")
def ours_no_t5(tiny_sd3_no_t5):
    with Pipeline.load(tiny_sd3_no_t5.bundle) as p:
        yield p


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize("guidance,negative,steps", [(7.0, None, 4), (4.5, "blurry", 3), (1.0, None, 3)])
def test_txt2img_matches_diffusers(request, t5, guidance, negative, steps):
    built = request.getfixturevalue("tiny_sd3" if t5 else "tiny_sd3_no_t5")
    pipe = request.getfixturevalue("ours" if t5 else "ours_no_t5")
    theirs = reference(built.source)(PROMPTS, negative_prompt=None if negative is None else [negative] * 2,
                                     num_inference_steps=steps, guidance_scale=guidance,
                                     latents=torch.from_numpy(LATENTS), output_type="np").images
    mine = pipe(PROMPTS, negative, num_inference_steps=steps, guidance_scale=guidance, latents=LATENTS,
                output_type="np")
    compare(mine.images, theirs)
    assert pipe.default_scheduler == "flow_euler"
    # one transformer call per step, CFG in the batch when guided, timed under the span the bench reads
    assert len([s for s in mine.spans if s.name == "unet"]) == steps


def test_prompt_2_3_negatives_and_sequence_length_match_diffusers(tiny_sd3, ours):
    kwargs = dict(prompt_2="a watercolor", prompt_3="a lighthouse at dusk", negative_prompt_2="jpeg artifacts",
                  negative_prompt_3="snow", max_sequence_length=77)
    theirs = reference(tiny_sd3.source)(PROMPTS[0], negative_prompt="blurry", num_inference_steps=3,
                                        guidance_scale=5.0, latents=torch.from_numpy(LATENTS[:1]), output_type="np",
                                        **kwargs).images
    mine = ours(PROMPTS[0], "blurry", num_inference_steps=3, guidance_scale=5.0, latents=LATENTS[:1],
                output_type="np", **kwargs)
    compare(mine.images, theirs)
    plain = ours(PROMPTS[0], "blurry", num_inference_steps=3, guidance_scale=5.0, latents=LATENTS[:1], output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-3  # the options changed the image


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(tiny_sd3, ours, clip_skip):
    theirs = reference(tiny_sd3.source)(PROMPTS[1], negative_prompt="blurry", clip_skip=clip_skip,
                                        num_inference_steps=2, guidance_scale=5.0,
                                        latents=torch.from_numpy(LATENTS[:1]), output_type="np").images
    mine = ours(PROMPTS[1], "blurry", clip_skip=clip_skip, num_inference_steps=2, guidance_scale=5.0,
                latents=LATENTS[:1], output_type="np")
    compare(mine.images, theirs)


def test_images_per_prompt_and_seeded_noise_match_diffusers(tiny_sd3, ours):
    theirs = reference(tiny_sd3.source)(PROMPTS, num_inference_steps=2, guidance_scale=6.0, num_images_per_prompt=2,
                                        generator=torch.Generator().manual_seed(7), output_type="np").images
    mine = ours(PROMPTS, num_inference_steps=2, guidance_scale=6.0, num_images_per_prompt=2, rng=StreamFrom(7),
                output_type="np")
    compare(mine.images, theirs)


@pytest.mark.parametrize("strength,steps", [(0.65, 6), (0.3, 4)])
def test_img2img_matches_diffusers(tiny_sd3, ours, strength, steps):
    """StableDiffusion3Img2ImgPipeline rounds the skipped steps down (0.65 x 6: 4 steps run, where SD's pipelines
    would run 3): the VAE's shift_factor on encode and decode, and the flow noising of the init latents."""
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    theirs = reference(tiny_sd3.source, "StableDiffusion3Img2ImgPipeline")(
        "a blue square", image=init, strength=strength, num_inference_steps=steps, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(21), output_type="np").images
    mine = ours("a blue square", image=init, strength=strength, num_inference_steps=steps, guidance_scale=6.0,
                rng=StreamFrom(21), output_type="np")
    compare(mine.images, theirs)
    ran = len([s for s in mine.spans if s.name == "unet"])
    assert ran == steps - int(steps - strength * steps)


def test_cfg_cutoff_matches_diffusers_sd3_callback(tiny_sd3, ours):
    from diffusers.callbacks import SD3CFGCutoffCallback

    theirs = reference(tiny_sd3.source)(PROMPTS[0], num_inference_steps=4, guidance_scale=6.0,
                                        latents=torch.from_numpy(LATENTS[:1]), output_type="np",
                                        callback_on_step_end=SD3CFGCutoffCallback(cutoff_step_ratio=0.5)).images
    mine = ours(PROMPTS[0], num_inference_steps=4, guidance_scale=6.0, latents=LATENTS[:1], cfg_cutoff=0.5,
                output_type="np")
    compare(mine.images, theirs)


def test_empty_prompt_2_falls_back_to_prompt_as_in_diffusers(tiny_sd3, ours):
    theirs = reference(tiny_sd3.source)(PROMPTS[0], prompt_2="", prompt_3="", negative_prompt="blurry",
                                        negative_prompt_2="", num_inference_steps=2, guidance_scale=5.0,
                                        latents=torch.from_numpy(LATENTS[:1]), output_type="np").images
    mine = ours(PROMPTS[0], "blurry", prompt_2="", prompt_3="", negative_prompt_2="", num_inference_steps=2,
                guidance_scale=5.0, latents=LATENTS[:1], output_type="np")
    compare(mine.images, theirs)


def test_a_long_t5_prompt_is_cut_with_a_warning(ours):
    with pytest.warns(UserWarning, match="a T5 prompt was cut to max_sequence_length=8 tokens; dropped: 'on a white"):
        ours("a red circle on a white background " * 3, num_inference_steps=1, max_sequence_length=8)


def test_a_non_square_size_matches_diffusers(tiny_sd3, ours):
    """Another crop of the transformer's position embedding (pos_embed_max_size) than the default size's."""
    latents = np.random.default_rng(8).standard_normal((1, 16, 24, 14)).astype(np.float32)  # 48x28 pixels
    theirs = reference(tiny_sd3.source)(PROMPTS[1], height=48, width=28, num_inference_steps=2, guidance_scale=5.0,
                                        latents=torch.from_numpy(latents), output_type="np").images
    mine = ours(PROMPTS[1], height=48, width=28, num_inference_steps=2, guidance_scale=5.0, latents=latents,
                output_type="np")
    compare(mine.images, theirs)


def test_low_memory_mode_gives_the_same_image(tiny_sd3, ours):
    kw = dict(prompt=PROMPTS[0], seed=5, num_inference_steps=2, prompt_3="a lighthouse")
    with Pipeline.load(tiny_sd3.bundle, low_memory=True) as lean:
        assert np.array_equal(np.asarray(lean(**kw).images[0]), np.asarray(ours(**kw).images[0]))


def test_heun_flow_scheduler_matches_diffusers(tiny_sd3, ours):
    theirs = reference(tiny_sd3.source, scheduler="FlowMatchHeunDiscreteScheduler")(
        PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(LATENTS[:1]),
        output_type="np").images
    mine = ours(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, latents=LATENTS[:1], scheduler="flow_heun",
                output_type="np")
    compare(mine.images, theirs)


def test_batched_steps_equal_each_request_alone(ours):
    kws = [dict(prompt=PROMPTS[0], seed=1, num_inference_steps=3), dict(prompt=PROMPTS[1], seed=2, num_inference_steps=2),
           dict(prompt=PROMPTS[1], seed=3, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=32)]
    alone = [np.asarray(ours(**kw).images[0]) for kw in kws]
    calls = []

    def run(graph, feeds):
        calls.append(feeds["sample"].shape[0])
        return ours.run_denoiser(graph, feeds)

    jobs = [ours.start(ours.request(**kw)) for kw in kws]
    while any(not j.done for j in jobs):
        step_together(jobs, run)
    together = [np.asarray(ours.finish(j).images[0]) for j in jobs]
    assert len(together) == 3 and all(np.array_equal(a, b) for a, b in zip(alone, together))
    assert calls == [4, 1, 4, 1, 2]  # the two guided jobs share a call; the shorter text never joins them


def test_bundle_defaults_are_diffusers_sd3_defaults(ours):
    assert ours.default_steps == 28 and ours.default_guidance == 7.0 and ours.size_multiple == 4


BAD = [
    (dict(max_sequence_length=257), "max_sequence_length=257 is over this bundle's limit 256"),
    (dict(max_sequence_length=0), "max_sequence_length=0; expected a positive integer"),
    (dict(prompt_3=5), "prompt_3 must be a string"),
    (dict(prompt_2=["a", "b", "c"]), "prompt_2 has 3 entries for 1 prompts"),
    (dict(clip_skip=3), r"clip_skip=3; expected an integer from 0 to 2"),
    (dict(clip_skip=-1), r"clip_skip=-1; expected an integer from 0 to 2"),
    (dict(height=30), "not a multiple of 4"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_sd3_input_is_one_line(ours, kwargs, message):
    with pytest.raises(InputError, match=message):
        ours("x", num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("key", ["prompt_3", "negative_prompt_3"])
def test_t5_prompts_on_a_bundle_without_t5_are_refused(ours_no_t5, key):
    # diffusers feeds zeros in T5's place and ignores prompt_3 silently; a caller who passes it expects an effect
    with pytest.raises(InputError, match=f"{key}= goes to T5 .* exported without"):
        ours_no_t5("x", num_inference_steps=2, **{key: "y"})


def test_an_sd_scheduler_on_sd3_is_refused(ours, tiny_sd3):
    with pytest.raises(ConfigError, match="scheduler 'ddim' cannot run a flow-matching model's schedule"):
        ours("x", num_inference_steps=2, scheduler="ddim")
    with pytest.raises(ConfigError, match="cannot run a flow-matching"):
        Pipeline.load(tiny_sd3.bundle, scheduler="euler")


def test_sd3_cli_generate_and_bad_options(tiny_sd3, tiny_sd3_no_t5, ours, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from edgediff.cli import main

    out = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_sd3.bundle), "-o", str(out), "--steps", "2",
                                  "--seed", "4", "--prompt-3", "a dog", "--max-sequence-length", "64"])
    assert r.exit_code == 0, r.output
    api = ours("a cat", num_inference_steps=2, seed=4, prompt_3="a dog", max_sequence_length=64)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    cases = [
        ([str(tiny_sd3.bundle), "--max-sequence-length", "300"], "max_sequence_length=300 is over this bundle's"),
        ([str(tiny_sd3_no_t5.bundle), "--prompt-3", "y"], "prompt_3= goes to T5"),
        ([str(tiny_sd3.bundle), "--scheduler", "ddim"], "scheduler 'ddim' cannot run a flow-matching"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["generate", "a cat", "-m", *args, "-o", str(tmp_path / "p.png")])
        assert r.exit_code != 0 and r.exit_code != 70 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_generation_never_imports_torch(request, t5, tmp_path):
    built = request.getfixturevalue("tiny_sd3" if t5 else "tiny_sd3_no_t5")
    assert_generates_without_torch(built.bundle, tmp_path / "x.png", num_inference_steps=2, seed=0, prompt_2="a square")


def test_a_longer_exported_limit_keeps_diffusers_default_length(tiny_sd3, tmp_path):
    """A bundle exported with --max-sequence-length 512 takes up to 512 T5 tokens, but a call that names none
    encodes StableDiffusion3Pipeline's default 256, as diffusers does with the same weights."""
    import dataclasses
    import shutil

    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    dst = tmp_path / "long"
    shutil.copytree(tiny_sd3.bundle, dst)
    write_manifest(dst, dataclasses.replace(Bundle.open(dst).manifest, max_sequence_length=512))
    with Pipeline.load(dst) as pipe:
        assert pipe.request("a cat").extra["max_sequence_length"] == 256
        assert pipe.request("a cat", max_sequence_length=512).extra["max_sequence_length"] == 512
