"""Tiled VAE decode and encode (runtime/vae_tiling.py) against diffusers' AutoencoderKL.enable_tiling.

Reference: diffusers AutoencoderKL (installed version) ``tiled_decode`` / ``_tiled_encode`` on the tiny SD1 fixture's
VAE (sample_size 16, VAE factor 2: 8x8-latent tiles, a stride of 6 latents, 4-pixel blends), at sizes that need
several tiles, including edge tiles narrower than the blend. Tolerance: max abs <= 2/255 on images in [0, 1] (the
project's bar; the arithmetic is the same, so the measured difference is ~1e-6), and whole pipelines with
``vae.enable_tiling()`` within 1e-3.
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff import Pipeline
from edgediff import images as img
from edgediff import vae_tiling as tiling
from edgediff.cli import main
from edgediff.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from streams import StreamFrom  # noqa: E402

PIXEL_TOL = 2 / 255


@pytest.fixture(scope="module")
def ours(tiny_sd1_bundle):
    with Pipeline.load(tiny_sd1_bundle) as p:
        yield p


@pytest.fixture(scope="module")
def vae(tiny_sd1_source):
    m = diffusers.AutoencoderKL.from_pretrained(tiny_sd1_source, subfolder="vae", local_files_only=True).eval()
    m.enable_tiling()
    return m


def decode(pipe, z, tiles):
    return tiling.run_vae(pipe.components, pipe.bundle, "vae_decoder", z, tiles)


@pytest.mark.parametrize("shape", [(1, 4, 20, 28), (2, 4, 13, 21), (1, 4, 9, 30)])
def test_tiled_decode_matches_diffusers(ours, vae, shape):
    """Several tiles each way; 13 and 21 leave 1-latent (2-pixel) edge tiles, narrower than the 4-pixel blend."""
    z = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)).sample.numpy()
    mine = decode(ours, z, True)
    assert mine.shape == theirs.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
    err = np.abs(img.to_float(mine) - img.to_float(theirs))
    assert err.max() <= PIXEL_TOL, f"max abs {err.max():.2e} at {np.unravel_index(int(np.argmax(err)), err.shape)}"
    assert np.abs(mine - theirs).max() <= 1e-4  # the same arithmetic: far inside the pixel bar
    whole = decode(ours, z, False)
    assert np.abs(whole - mine).max() > 1e-3  # tiles were really decoded apart (and blended)


def test_tiled_encode_matches_diffusers(ours, vae):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 40, 56)).astype(np.float32)
    with torch.no_grad():
        theirs = vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()  # tiled: 40x56 > 16x16 tiles
    mine = tiling.run_vae(ours.components, ours.bundle, "vae_encoder", x, True)
    assert mine.shape == theirs.shape
    assert np.abs(mine - theirs).max() <= 1e-4
    whole = tiling.run_vae(ours.components, ours.bundle, "vae_encoder", x, False)
    assert np.abs(whole - mine).max() > 1e-3


@pytest.fixture
def vae_tiles_of(tiny_sd1_source):
    """diffusers' AutoencoderKL with enable_tiling() and its tile set as a user sets it: both min-size attributes."""
    def make(tile_px: int):
        m = diffusers.AutoencoderKL.from_pretrained(tiny_sd1_source, subfolder="vae", local_files_only=True).eval()
        m.enable_tiling()
        m.tile_sample_min_size, m.tile_latent_min_size = tile_px, tile_px // 2  # the fixture's VAE factor is 2
        return m
    return make


@pytest.mark.parametrize("tile_px", [8, 24])
def test_tile_size_decode_matches_diffusers_with_that_tile(ours, vae_tiles_of, tile_px):
    """vae_tile_size = diffusers' tile_sample_min_size (tile_latent_min_size = it / factor): smaller and larger
    tiles than the config's 16 pixels, the smallest allowed (4 latent cells) included."""
    z = np.random.default_rng(tile_px).standard_normal((1, 4, 20, 28)).astype(np.float32)
    with torch.no_grad():
        theirs = vae_tiles_of(tile_px).decode(torch.from_numpy(z)).sample.numpy()
    mine = tiling.run_vae(ours.components, ours.bundle, "vae_decoder", z, True, tile_px)
    assert mine.shape == theirs.shape
    assert np.abs(mine - theirs).max() <= 1e-4, np.abs(mine - theirs).max()
    assert np.abs(decode(ours, z, True) - mine).max() > 1e-3  # not the default tile's result


def test_tile_size_encode_matches_diffusers_with_that_tile(ours, vae_tiles_of):
    x = np.random.default_rng(3).uniform(-1, 1, (1, 3, 40, 56)).astype(np.float32)
    with torch.no_grad():
        theirs = vae_tiles_of(8).encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
    mine = tiling.run_vae(ours.components, ours.bundle, "vae_encoder", x, True, 8)
    assert mine.shape == theirs.shape
    assert np.abs(mine - theirs).max() <= 1e-4, np.abs(mine - theirs).max()


def test_pipeline_vae_tile_size_matches_diffusers(tiny_sd1_source, ours):
    latents = np.random.default_rng(2).standard_normal((1, 4, 20, 28)).astype(np.float32)  # 40x56 pixels
    ref = _reference(tiny_sd1_source)
    ref.vae.tile_sample_min_size, ref.vae.tile_latent_min_size = 8, 4
    theirs = ref("a red circle", num_inference_steps=3, guidance_scale=7.5, height=40, width=56,
                 latents=torch.from_numpy(latents), output_type="np").images
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=40, width=56, latents=latents, scheduler="euler",
              output_type="np", vae_tiling=True)
    mine = ours("a red circle", vae_tile_size=8, **kw)
    _close(mine.images, theirs)
    default_tile = ours("a red circle", **kw)
    assert np.abs(np.stack(default_tile.images) - np.stack(mine.images)).max() > 1e-3


@pytest.mark.parametrize("bad, message", [
    (6, r"vae_tile_size=6: use a positive multiple of 8 pixels \(4 latent cells, so the quarter-tile overlap"),
    (12, r"vae_tile_size=12: use a positive multiple of 8 pixels"),
    (0, r"vae_tile_size=0: use a positive multiple of 8"),
    (-16, r"vae_tile_size=-16: use a positive multiple of 8"),
    (16.0, r"vae_tile_size must be a whole number of pixels"),
    ("256", r"vae_tile_size must be a whole number of pixels"),
    (True, r"vae_tile_size must be a whole number of pixels"),
])
def test_bad_tile_size_is_refused(ours, bad, message):
    with pytest.raises(InputError, match=message):
        ours("x", num_inference_steps=1, vae_tile_size=bad)


def test_tile_size_with_tiling_off_is_refused(ours):
    with pytest.raises(InputError, match="vae_tile_size sets the tile of tiled VAE decode, which vae_tiling=False"):
        ours("x", num_inference_steps=1, vae_tiling=False, vae_tile_size=16)


def _reference(source, img2img=False):
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(source, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    return pipe


def _close(mine, theirs, tol=1e-3):
    mine, theirs = np.stack(mine), np.asarray(theirs)
    err = np.abs(mine - theirs)
    assert err.max() <= tol, f"max abs {err.max():.2e} at {np.unravel_index(int(np.argmax(err)), err.shape)}"
    assert theirs.std() > 0.01


def test_txt2img_with_tiling_matches_diffusers_enable_tiling(tiny_sd1_source, ours):
    latents = np.random.default_rng(2).standard_normal((1, 4, 20, 28)).astype(np.float32)  # 40x56 pixels
    theirs = _reference(tiny_sd1_source)("a red circle", num_inference_steps=3, guidance_scale=7.5, height=40,
                                         width=56, latents=torch.from_numpy(latents), output_type="np").images
    mine = ours("a red circle", num_inference_steps=3, guidance_scale=7.5, height=40, width=56, latents=latents,
                scheduler="euler", output_type="np", vae_tiling=True)
    _close(mine.images, theirs)
    plain = ours("a red circle", num_inference_steps=3, guidance_scale=7.5, height=40, width=56, latents=latents,
                 scheduler="euler", output_type="np")
    assert np.abs(np.stack(plain.images) - np.stack(mine.images)).max() > 1e-3  # the default does not tile here


def test_img2img_encodes_tiled_as_diffusers(tiny_sd1_source, ours):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    theirs = _reference(tiny_sd1_source, img2img=True)("a blue square", image=init, strength=0.6,
                                                       num_inference_steps=5, guidance_scale=6.0,
                                                       generator=torch.Generator().manual_seed(21),
                                                       output_type="np").images
    mine = ours("a blue square", image=init, strength=0.6, num_inference_steps=5, guidance_scale=6.0, seed=21,
                rng="torch", scheduler="euler", output_type="np", vae_tiling=True)
    _close(mine.images, theirs)


def test_default_is_untiled_until_memory_runs_short(ours, monkeypatch):
    """vae_tiling=None: whole while the estimate fits in available memory (bit-identical to vae_tiling=False);
    tiled when it does not, here (1 KiB: no tile fits) in the smallest tiles, 4 latent cells."""
    kw = dict(prompt="a red circle", num_inference_steps=2, height=40, width=56, seed=4, output_type="np")
    never = ours(**kw, vae_tiling=False).images[0]
    forced = ours(**kw, vae_tiling=True, vae_tile_size=8).images[0]
    assert np.array_equal(ours(**kw).images[0], never)
    job = ours.start(ours.request(**kw))
    while not job.done:
        job.advance(ours.run_denoiser(job.graph(), job.unet_feeds()))
    monkeypatch.setattr("edgediff.validation.available_memory", lambda: 1 << 10)  # only while the VAE runs
    assert np.array_equal(ours.finish(job).images[0], forced)
    monkeypatch.setattr("edgediff.validation.available_memory", lambda: None)  # unknown: never tiles by itself
    job = ours.start(ours.request(**kw))
    while not job.done:
        job.advance(ours.run_denoiser(job.graph(), job.unet_feeds()))
    assert np.array_equal(ours.finish(job).images[0], never)


def test_memory_short_even_for_one_tile_halves_the_tile(ours, monkeypatch):
    """Automatic tiling whose own 16-pixel (8-cell) tile would not fit either runs in 8-pixel tiles: the same
    result as asking for vae_tile_size=8."""
    z = np.random.default_rng(8).standard_normal((1, 4, 20, 28)).astype(np.float32)
    channels = ours.bundle.config("vae_decoder/config.json")["block_out_channels"]
    need = {cells: tiling.activation_bytes(batch=1, latent_h=cells, latent_w=cells, vae_scale_factor=2,
                                           channels=channels) for cells in (4, 8)}
    monkeypatch.setattr("edgediff.validation.available_memory", lambda: (need[4] + need[8]) // 2)
    auto = decode(ours, z, None)
    assert np.array_equal(auto, tiling.run_vae(ours.components, ours.bundle, "vae_decoder", z, True, 8))
    assert np.abs(auto - decode(ours, z, True)).max() > 1e-3  # not the VAE's own 16-pixel tiles
    monkeypatch.setattr("edgediff.validation.available_memory", lambda: (need[8] + 1))
    assert np.array_equal(decode(ours, z, None), decode(ours, z, True))  # one own tile fits: diffusers' tiles


def test_one_tile_or_less_is_never_tiled(ours):
    """diffusers decodes a latent no larger than one tile whole; so does a forced tiling."""
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 6)).astype(np.float32)
    assert np.array_equal(decode(ours, z, True), decode(ours, z, False))


def test_activation_estimate_grows_with_the_image():
    small = tiling.activation_bytes(batch=1, latent_h=64, latent_w=64, vae_scale_factor=8, channels=[128, 256, 512, 512])
    big = tiling.activation_bytes(batch=1, latent_h=128, latent_w=128, vae_scale_factor=8,
                                  channels=[128, 256, 512, 512])
    assert big > 4 * small > 0
    assert big > 4 * 2**30  # an SD-1.5 1024x1024 decode needs gigabytes, not megabytes


@pytest.mark.parametrize("bad", ["yes", 1, 0.5])
def test_bad_flag_is_refused(ours, bad):
    with pytest.raises(InputError, match="vae_tiling must be True, False or None"):
        ours("x", num_inference_steps=1, vae_tiling=bad)


# -- static-shape decoders: one tile graph ----------------------------------------------------------------------
def _static_decoder(bundle, dst, side: int):
    """A copy of ``bundle`` whose vae_decoder takes only (.., side, side) latents, re-pinned in its manifest."""
    import onnx

    from edgediff.bundle.describe import component_entry
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest
    from edgediff.engines.graphs import set_static_dims

    shutil.copytree(bundle, dst)
    path = dst / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    set_static_dims(model, {"latent_sample": {2: side, 3: side}})
    onnx.save(model, str(path))
    m = Bundle.open(bundle).manifest
    comp = component_entry(dst, "vae_decoder", parity=m.components["vae_decoder"].parity)
    write_manifest(dst, dataclasses.replace(m, components={**m.components, "vae_decoder": comp}))
    return dst


def test_static_decoder_fixed_to_the_tile_runs_every_tile_full_size(tiny_sd1_bundle, ours, vae, tmp_path):
    """Every tile full-size (the last ones moved back to end at the edge): one graph shape, the same blend."""
    static = _static_decoder(tiny_sd1_bundle, tmp_path / "static8", 8)
    z = np.random.default_rng(6).standard_normal((1, 4, 20, 28)).astype(np.float32)
    shapes = []
    with Pipeline.load(static) as pipe:
        backend = pipe.components.get("vae_decoder")
        run = backend.run

        def spy(feeds):
            shapes.append(feeds["latent_sample"].shape[2:])
            return run(feeds)

        backend.run = spy
        mine = decode(pipe, z, True)
    # rows start at 0, 6, 12 (18 would pass the edge: 12 ends there); columns at 0, 6, 12, 18 and 20 (not 24)
    assert set(shapes) == {(8, 8)} and len(shapes) == 3 * 5
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)).sample.numpy()
    # where both decode the same tiles (all but diffusers' narrow last ones), the result is diffusers' own
    assert np.abs(mine[..., :36, :48] - theirs[..., :36, :48]).max() <= 1e-4
    assert mine.shape == theirs.shape and np.isfinite(mine).all()


def test_static_decoder_fixed_to_another_size_is_refused(tiny_sd1_bundle, tmp_path):
    static = _static_decoder(tiny_sd1_bundle, tmp_path / "static10", 10)
    with Pipeline.load(static) as pipe:
        with pytest.raises(InputError, match=r"vae_decoder is fixed to 10x10 latent cells .* one 8x8 tile"):
            pipe("x", num_inference_steps=1, height=40, width=56, vae_tiling=True)


def test_cli_vae_tiling(tiny_sd1_bundle, tmp_path):
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "t.png"),
                                  "--steps", "2", "--size", "56x40", "--seed", "3", "--vae-tiling"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "u.png"),
                                  "--steps", "2", "--size", "56x40", "--seed", "3", "--no-vae-tiling"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(tmp_path / "t.png") as t, Image.open(tmp_path / "u.png") as u:
        assert t.size == u.size == (56, 40) and t.tobytes() != u.tobytes()
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "v.png"),
                                  "--steps", "2", "--size", "56x40", "--seed", "3", "--vae-tiling",
                                  "--vae-tile-size", "8"])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "t.png") as t, Image.open(tmp_path / "v.png") as v:
        assert v.size == (56, 40) and t.tobytes() != v.tobytes()
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(tiny_sd1_bundle), "-o", str(tmp_path / "w.png"),
                                  "--steps", "2", "--vae-tile-size", "7"])
    assert r.exit_code != 0 and "vae_tile_size=7: use a positive multiple of 8 pixels" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "w.png").exists()
