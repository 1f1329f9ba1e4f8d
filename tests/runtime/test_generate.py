"""The embedding story: no torch at inference, thread safety, bad input (API and CLI), and output files."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.errors import BundleNotFound, ConfigError, InputError
from no_torch import assert_generates_without_torch


@pytest.fixture(scope="module")
def pipe(tiny_sd1_bundle):
    return Pipeline.load(tiny_sd1_bundle)


def test_generation_never_imports_torch(tiny_sd1_bundle, tmp_path):
    assert_generates_without_torch(tiny_sd1_bundle, tmp_path / "x.png", num_inference_steps=3, seed=0)


def test_import_edgediff_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, edgediff; print(sorted(m for m in ('onnxruntime', 'torch', 'tokenizers', 'PIL') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_threads_match_serial(pipe):
    jobs = [(f"prompt {k}", 100 + k) for k in range(5)]
    serial = {seed: pipe(p, num_inference_steps=3, seed=seed, output_type="np").images[0] for p, seed in jobs}
    results: dict = {}
    errors: list = []

    def worker(t: int) -> None:
        try:
            for p, seed in jobs:
                results[(t, seed)] = pipe(p, num_inference_steps=3, seed=seed, output_type="np").images[0]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(results) == 20
    for (t, seed), img in results.items():
        np.testing.assert_array_equal(img, serial[seed])


def test_low_memory_mode_gives_the_same_image(tiny_sd1_bundle, pipe):
    low = Pipeline.load(tiny_sd1_bundle, low_memory=True)
    a = low("a dog", num_inference_steps=3, seed=5, output_type="np").images[0]
    b = pipe("a dog", num_inference_steps=3, seed=5, output_type="np").images[0]
    # without pre-packed weights (low-memory mode) MLAS sums in another order: ~1e-6 apart
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_shared_arena_gives_the_same_image(tiny_sd1_bundle):
    """One process-wide arena for all sessions (the memory-saving mode) computes what per-session arenas compute,
    and registering it again for a second pipeline is harmless."""
    from edgediff.backends.ort import OrtOptions

    images = []
    for shared in (True, False, True):
        with Pipeline.load(tiny_sd1_bundle, options=OrtOptions(shared_arena=shared)) as p:
            images.append(p("a dog", num_inference_steps=3, seed=5, output_type="np").images[0])
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[2], images[1])


def test_callback_and_cancel(pipe):
    from edgediff.errors import Cancelled

    seen = []
    pipe("x", num_inference_steps=4, seed=0, scheduler="euler", callback=lambda i, n, t, x: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    with pytest.raises(Cancelled, match="before step 3 of 4"):
        pipe("x", num_inference_steps=4, seed=0, scheduler="euler", cancel=lambda: len(seen) >= 6,
             callback=lambda i, n, t, x: seen.append(i))


def test_non_finite_latents_are_refused_as_input(pipe):
    bad = np.full((1, 4, 8, 8), np.nan, np.float32)
    with pytest.raises(InputError, match="latents contain NaN/Inf"):
        pipe("x", num_inference_steps=2, latents=bad, scheduler="euler")


def test_empty_prompt_is_an_unconditional_image(pipe):
    r = pipe("", num_inference_steps=2, seed=0)
    assert r.images[0].size == (16, 16)


BAD = [
    (dict(prompt=42), InputError, "prompt must be a string"),
    (dict(prompt="x" * 100_000), InputError, "100000 characters"),
    (dict(num_inference_steps=0), InputError, "between 1 and 1000"),
    (dict(num_inference_steps=-1), InputError, "between 1 and 1000"),
    (dict(num_inference_steps=10_000), InputError, "between 1 and 1000"),
    (dict(guidance_scale=float("nan")), InputError, "finite number"),
    (dict(guidance_scale=-1.0), InputError, "finite number"),
    (dict(image="MISSING", strength=0.5), InputError, "init image not found"),
    (dict(image="INIT", strength=0.0), InputError, r"strength=0.0; must be in \(0, 1\]"),
    (dict(image="INIT", strength=1.5), InputError, r"must be in \(0, 1\]"),
    (dict(height=18), InputError, "not a multiple of 4"),
    (dict(height=400_000, width=400_000), InputError, "GiB is available"),
    (dict(scheduler="heun"), ConfigError, "unknown scheduler 'heun'"),
    (dict(rng="mt"), InputError, "unknown rng 'mt'"),
    (dict(num_images_per_prompt=0), InputError, "num_images_per_prompt"),
    (dict(rng=None), InputError, "rng must be"),
    (dict(rng=object()), InputError, "rng must be"),
    (dict(callback=5), InputError, "callback must be callable"),
    (dict(cancel=True), InputError, "cancel must be callable"),
    (dict(strength=0.5), InputError, "strength only applies to img2img"),
    (dict(image="INIT", latents=np.zeros((1, 4, 4, 4), np.float32)), InputError, "latents= is for text-to-image"),
    (dict(prompt="red \udcff circle"), InputError, "not valid Unicode text"),
    (dict(negative_prompt="\ud800"), InputError, "negative_prompt is not valid Unicode"),
    (dict(image="BOMB"), InputError, "megapixels|too large"),
    (dict(output_type="latents"), InputError, "output_type"),
]


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's header; no pixel data needed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises_typed_error(pipe, tmp_path, kwargs, exc, match):
    kwargs = dict(kwargs)
    if kwargs.get("image") == "INIT":
        Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
        kwargs["image"] = tmp_path / "init.png"
    elif kwargs.get("image") == "MISSING":
        kwargs["image"] = tmp_path / "missing.png"
    elif kwargs.get("image") == "BOMB":
        _png_header_only(tmp_path / "bomb.png", 16000, 16000)
        kwargs["image"] = tmp_path / "bomb.png"
    prompt = kwargs.pop("prompt", "a prompt")
    with pytest.raises(exc, match=match):
        pipe(prompt, **{"num_inference_steps": 2, **kwargs})


def test_unreadable_init_image(pipe, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read init image"):
        pipe("x", image=tmp_path / "bad.png", num_inference_steps=2)


def test_init_image_over_the_pixel_limit_is_refused_before_decoding(pipe, tmp_path):
    _png_header_only(tmp_path / "big.png", 9000, 9000)  # under PIL's own bomb limit, over ours
    with pytest.raises(InputError, match="81 megapixels"):
        pipe("x", image=tmp_path / "big.png", num_inference_steps=2)


def test_bad_bundle_and_backend(tmp_path, tiny_sd1_bundle):
    with pytest.raises(BundleNotFound):
        Pipeline.load(tmp_path / "nope")
    with pytest.raises(InputError, match="bundle folder path, not NoneType"):
        Pipeline.load(None)
    with pytest.raises(InputError, match="low_memory must be True or False, not 'no'"):
        Pipeline.load(tiny_sd1_bundle, low_memory="no")
    with pytest.raises(InputError, match="unknown backend 'gpu'"):
        Pipeline.load(tiny_sd1_bundle, backend="gpu")
    from edgediff.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu|edgediff\\[gpu\\]"):
        Pipeline.load(tiny_sd1_bundle, backend="cuda")


# -- CLI -----------------------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_generate_writes_png_with_parameters(tiny_sd1_bundle, tmp_path):
    out = tmp_path / "out.png"
    r = cli("generate", "a red circle", "-m", tiny_sd1_bundle, "-o", out, "--steps", "3", "--seed", "9",
            "--num-images", "2", "--scheduler", "euler", "--negative", "blurry")
    assert r.exit_code == 0, r.output
    for k in (0, 1):
        img = Image.open(tmp_path / f"out-{k}.png")
        params = json.loads(img.text["parameters"])
        assert params["seed"] == 9 + k and params["prompt"] == "a red circle" and params["steps"] == 3
        assert params["scheduler"] == "euler" and params["negative_prompt"] == ["blurry"] and len(params["bundle"]) == 64
    # no clobbering without --overwrite, and the old file is untouched
    before = (tmp_path / "out-0.png").read_bytes()
    r = cli("generate", "another", "-m", tiny_sd1_bundle, "-o", out, "--steps", "2", "--num-images", "2")
    assert r.exit_code != 0 and "--overwrite" in r.output
    assert (tmp_path / "out-0.png").read_bytes() == before
    r = cli("generate", "another", "-m", tiny_sd1_bundle, "-o", out, "--steps", "2", "--num-images", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


CLI_BAD = [
    (["--steps", "0"], "between 1 and 1000"),
    (["--steps", "-1"], "between 1 and 1000"),
    (["--guidance", "nan"], "finite number"),
    (["--size", "17x16"], "not a multiple of 4"),
    (["--size", "big"], "expected WIDTHxHEIGHT"),
    (["--scheduler", "heun"], "unknown scheduler"),
    (["--backend", "gpu"], "unknown backend"),
    (["--rng", "mt"], "unknown rng"),
    (["--init-image", "/nonexistent.png"], "init image not found"),
    (["--init-image", "INIT", "--strength", "2"], "strength=2.0"),
    (["--strength", "0.5"], "strength only applies to img2img"),
    (["--num-images", "0"], "num_images_per_prompt=0"),
    (["--size", "0x16"], "expected WIDTHxHEIGHT"),
    (["-o", "/proc/edgediff-out.png"], "cannot write to /proc"),
    (["-o", "LONGNAME"], "too long"),
]


@pytest.mark.parametrize("args,match", CLI_BAD, ids=[m for _, m in CLI_BAD])
def test_cli_bad_input_is_one_line(tiny_sd1_bundle, tmp_path, args, match):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
    args = [str(tmp_path / "init.png") if a == "INIT" else a for a in args]
    args = [str(tmp_path / ("x" * 300 + ".png")) if a == "LONGNAME" else a for a in args]
    r = cli("generate", "x", "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", *args)
    assert r.exit_code != 0
    lines = [l for l in r.output.splitlines() if l.strip() and "denoising" not in l]
    assert lines[-1].startswith("error: ") and match in lines[-1], r.output
    assert "Traceback" not in r.output


def test_cli_non_utf8_prompt_is_one_line(tiny_sd1_bundle, tmp_path):
    r = cli("generate", "red \udcff circle", "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--steps", "1")
    assert r.exit_code == 2 and "error: prompt is not valid Unicode text" in r.output, r.output
    assert not (tmp_path / "o.png").exists()


def test_cli_huge_image_count_is_refused_at_once(tiny_sd1_bundle, tmp_path):
    import time

    t0 = time.perf_counter()
    r = cli("generate", "x", "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--num-images", "1000000")
    assert r.exit_code == 2 and "between 1 and 64" in r.output
    assert time.perf_counter() - t0 < 5  # refused before a million paths are built (38 s before the fix)


def test_cli_full_disk_is_found_before_the_work(tiny_sd1_bundle, tmp_path, monkeypatch):
    import shutil as _shutil

    from edgediff import outputs

    real = _shutil.disk_usage
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    calls = []
    monkeypatch.setattr(Pipeline, "generate", lambda self, *a, **k: calls.append(1))
    r = cli("generate", "x", "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--num-images", "4")
    assert r.exit_code != 0 and "MiB free" in r.output and not calls  # nothing generated, nothing written
    assert list(tmp_path.iterdir()) == []


def test_cli_png_honours_the_umask(tiny_sd1_bundle, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        r = cli("generate", "x", "-m", tiny_sd1_bundle, "-o", tmp_path / "o.png", "--steps", "1", "--seed", "0")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "o.png").stat().st_mode) == 0o644


def test_cli_bundle_missing(tmp_path):
    r = cli("generate", "x", "-m", tmp_path / "nope", "-o", tmp_path / "o.png")
    assert r.exit_code != 0 and "bundle not found" in r.output


def test_cli_help_and_version():
    assert cli("--version").output.startswith("edgediff, version")
    r = cli("--help")
    assert r.exit_code == 0 and "generate" in r.output and "export" in r.output and "inspect" in r.output


def test_bundle_recommended_defaults_apply_when_a_call_names_none(bundle_copy, tmp_path):
    import dataclasses

    from edgediff.bundle.manifest import GenerationDefaults
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    m = Bundle.open(bundle_copy).manifest
    write_manifest(bundle_copy, dataclasses.replace(m, defaults=GenerationDefaults(steps=3, guidance_scale=1.0)))
    with Pipeline.load(bundle_copy) as p:
        assert (p.default_steps, p.default_guidance) == (3, 1.0)
        r = p("a cat", seed=0, scheduler="euler")  # one UNet call per step (the fixture's PNDM makes 4 of 3)
        assert r.parameters["steps"] == 3 and r.parameters["guidance_scale"] == 1.0
        assert len([s for s in r.spans if s.name == "unet"]) == 3
        r = p("a cat", seed=0, num_inference_steps=2, guidance_scale=7.5)  # the call's own win
        assert r.parameters["steps"] == 2 and r.parameters["guidance_scale"] == 7.5
    out = tmp_path / "o.png"
    r = cli("generate", "a cat", "-m", bundle_copy, "-o", out, "--seed", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(out).text["parameters"])["steps"] == 3
    r = cli("inspect", bundle_copy)
    assert "defaults steps 3  guidance 1.0" in r.output
    write_manifest(bundle_copy, m)  # no defaults recorded: the runtime's own
    with Pipeline.load(bundle_copy) as p:
        assert (p.default_steps, p.default_guidance) == (25, 7.5)
