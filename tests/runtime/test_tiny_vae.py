"""decoder="tiny" and step previews (runtime/tiny_vae.py) against diffusers with ``pipe.vae = AutoencoderTiny``.

Reference: diffusers StableDiffusionPipeline (installed version) from the tiny SD1 fixture with its vae replaced by a
tiny random AutoencoderTiny (tests/tiny_vae_fixtures.py, scaling_factor 0.7 so the division by the config's factor
is exercised), same initial latents and noise. Tolerance: max abs <= 1e-3 on float images in [0, 1]; previews
(uint8) within 2/255 of diffusers' AutoencoderTiny.decode of the same latents.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from streams import StreamFrom, assert_images_close  # noqa: E402
from tiny_vae_fixtures import tiny_sd1_with_taesd  # noqa: E402

TOL = 1e-3


@pytest.fixture(scope="module")
def built(tiny_sd1_source, tmp_path_factory):
    return tiny_sd1_with_taesd(tiny_sd1_source, tmp_path_factory)


@pytest.fixture(scope="module")
def ours(built):
    with Pipeline.load(built.bundle) as p:
        yield p


@pytest.fixture(scope="module")
def taesd(built):
    return diffusers.AutoencoderTiny.from_pretrained(built.taesd).eval()


def reference(source, taesd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                                 requires_safety_checker=False, local_files_only=True)
    pipe.vae = taesd  # what diffusers' docs do for TAESD
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(ours, theirs) -> None:
    assert_images_close(ours, theirs, TOL)


@pytest.mark.parametrize("size", [(16, 16), (24, 40)])
def test_tiny_decoder_matches_diffusers_with_autoencoder_tiny(tiny_sd1_source, taesd, ours, size):
    h, w = size
    latents = np.random.default_rng(3).standard_normal((2, 4, h // 2, w // 2)).astype(np.float32)
    prompts = ["a red circle on white", "an astronaut riding a horse"]
    theirs = reference(tiny_sd1_source, taesd)(prompts, num_inference_steps=4, guidance_scale=7.5, height=h,
                                                width=w, latents=torch.from_numpy(latents), output_type="np").images
    mine = ours(prompts, num_inference_steps=4, guidance_scale=7.5, height=h, width=w, latents=latents,
                scheduler="euler", rng=StreamFrom(0), output_type="np", decoder="tiny")
    compare(mine.images, theirs)
    assert mine.parameters["decoder"] == "tiny"
    full = ours(prompts, num_inference_steps=4, guidance_scale=7.5, height=h, width=w, latents=latents,
                scheduler="euler", output_type="np")
    assert np.abs(np.stack(full.images) - np.stack(mine.images)).max() > 1e-2  # the VAE is not what decoded it
    assert "decoder" not in full.parameters


def test_preview_is_diffusers_tiny_decode(ours, taesd):
    latents = np.random.default_rng(7).standard_normal((2, 4, 8, 12)).astype(np.float32)
    with torch.no_grad():
        theirs = taesd.decode(torch.from_numpy(latents) / taesd.config.scaling_factor).sample.numpy()
    theirs = (np.clip(theirs / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).round()
    previews = ours.preview(latents)
    assert [p.size for p in previews] == [(24, 16)] * 2
    mine = np.stack([np.asarray(p, dtype=np.float64) for p in previews])
    assert np.abs(mine - theirs).max() <= 2


def test_previews_every_k_steps_through_the_callback(ours):
    """The documented recipe: a step callback that decodes a preview with the tiny decoder every k steps."""
    previews = []

    def every_2(i, total, t, latents):
        if i % 2 == 0:
            previews.append((i, ours.preview(latents)))

    result = ours("a red circle", num_inference_steps=6, seed=3, callback=every_2)
    assert [i for i, _ in previews] == [2, 4, 6]
    assert all(len(p) == 1 and p[0].size == result.images[0].size for _, p in previews)
    last = np.asarray(previews[-1][1][0], dtype=np.int16)
    tiny = np.asarray(ours("a red circle", num_inference_steps=6, seed=3, decoder="tiny").images[0], dtype=np.int16)
    assert np.abs(last - tiny).max() <= 1  # the last preview is the tiny-decoded final image


def test_previews_also_work_in_low_memory_mode(built):
    with Pipeline.load(built.bundle, low_memory=True) as pipe:
        seen = []
        pipe("x", num_inference_steps=2, seed=0, scheduler="euler",
             callback=lambda i, n, t, x: seen.append(pipe.preview(x)))
        assert len(seen) == 2


def test_latent_output_ignores_the_decoder(ours):
    kw = dict(num_inference_steps=2, seed=1, output_type="latent")
    assert np.array_equal(ours("x", **kw).latents, ours("x", decoder="tiny", **kw).latents)


def test_bundle_without_tiny_decoder_refuses_it(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        with pytest.raises(InputError, match="decoder='tiny' needs a tiny autoencoder .* no vae_decoder_tiny: "
                                             "re-export it with edgediff export SRC OUT --tiny-vae TAESD_DIR"):
            pipe("x", num_inference_steps=1, decoder="tiny")
        with pytest.raises(InputError, match="no vae_decoder_tiny"):
            pipe.preview(np.zeros((1, 4, 8, 8), np.float32))


@pytest.mark.parametrize("bad", ["taesd", None, 1])
def test_unknown_decoder_is_refused(ours, bad):
    with pytest.raises(InputError, match=r"decoder=.*expected one of \['full', 'tiny'\]"):
        ours("x", num_inference_steps=1, decoder=bad)


@pytest.mark.parametrize("bad", [np.zeros((1, 3, 8, 8), np.float32), np.zeros((4, 8, 8), np.float32),
                                 np.zeros((1, 4, 8, 8), np.int64), "latents"])
def test_preview_refuses_what_is_not_latents(ours, bad):
    with pytest.raises(InputError, match=r"preview takes latents of shape \(N, 4, h, w\)"):
        ours.preview(bad)


def test_cli_decoder_tiny(built, tiny_sd1_bundle, tmp_path):
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(built.bundle), "-o", str(tmp_path / "o.png"),
                                  "--steps", "2", "--decoder", "tiny", "--seed", "0"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(tmp_path / "o.png") as im:
        assert json.loads(im.info["parameters"])["decoder"] == "tiny"
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "p.png"),
                                  "--steps", "2", "--decoder", "tiny"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: decoder='tiny' needs"), r.output
    assert not (tmp_path / "p.png").exists()


def test_optimize_keeps_the_tiny_autoencoder(built, ours, tmp_path):
    """edgediff optimize checks vae_decoder_tiny / vae_encoder_tiny on the VAE's captured inputs (the tiny
    autoencoder does not run in the capture) and the optimized bundle decodes as the exported one."""
    from edgediff.engines.optimize import optimize_bundle

    out = optimize_bundle(built.bundle, tmp_path / "opt", target="cpu")
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with Pipeline.load(out) as opt:
        for name in ("vae_decoder_tiny", "vae_encoder_tiny"):
            r = opt.bundle.component(name).parity
            assert r is not None and r.passed and "parent bundle" in r.reference, (name, r)
        a = np.asarray(opt.preview(latents)[0], dtype=np.int16)
    assert np.abs(a - np.asarray(ours.preview(latents)[0], dtype=np.int16)).max() <= 1
