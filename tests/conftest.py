"""Shared fixtures: tiny random Stable Diffusion pipelines (diffusers classes from small configs, built in-process,
nothing downloaded) and their exported bundles, built once per test session."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config):
    # edgediff caches large files' hashes and TensorRT engines under $XDG_CACHE_HOME: keep the suite's own
    config._edgediff_cache = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="edgediff-test-cache-")


def pytest_unconfigure(config):
    # ... and leave nothing behind in the user's temp folder
    shutil.rmtree(getattr(config, "_edgediff_cache", ""), ignore_errors=True)


def _have(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


needs_torch = pytest.mark.skipif(not (_have("torch") and _have("diffusers")), reason="needs the [export] extra (torch, diffusers)")


@pytest.fixture(scope="session")
def tiny_sd1_source(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from edgediff.export.random_pipeline import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-sd1", "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2v_source(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    from edgediff.export.random_pipeline import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-sd2v", "tiny-sd2v", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_bundle(tiny_sd1_source, tmp_path_factory) -> Path:
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_sd1_source, tmp_path_factory.mktemp("bundles") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd1_deepcache_bundle(tiny_sd1_source, tmp_path_factory) -> Path:
    """The tiny SD1 model exported with DeepCache's graphs for branches 0 and 1 (export --deepcache 0,1)."""
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_sd1_source, tmp_path_factory.mktemp("bundles") / "tiny-sd1-dc", deepcache="0,1")


@pytest.fixture(scope="session")
def tiny_sd2v_bundle(tiny_sd2v_source, tmp_path_factory) -> Path:
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_sd2v_source, tmp_path_factory.mktemp("bundles") / "tiny-sd2v")


@pytest.fixture(scope="session")
def tiny_lcm_source(tmp_path_factory) -> Path:
    """A tiny random Latent Consistency Model (tiny-sd1 with a time_cond_proj_dim UNet and LCMScheduler)."""
    pytest.importorskip("diffusers")
    from edgediff.export.random_pipeline import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-lcm", "tiny-lcm", seed=0)


@pytest.fixture(scope="session")
def tiny_lcm_bundle(tiny_lcm_source, tmp_path_factory) -> Path:
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_lcm_source, tmp_path_factory.mktemp("bundles") / "tiny-lcm")


@pytest.fixture
def bundle_copy(tiny_sd1_bundle, tmp_path) -> Path:
    """A private copy of the tiny SD1 bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_sd1_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory):
    """The tiny random SDXL base pipeline and its exported bundle (tests/sdxl_fixtures.py: ``.source``, ``.bundle``)."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_sdxl

    return tiny_sdxl(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory):
    """The tiny random SDXL refiner pipeline and its exported bundle."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_sdxl

    return tiny_sdxl(tmp_path_factory, "tiny-sdxl-refiner")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """The tiny random SD3 pipeline (CLIP-L, CLIP-G, T5) and its exported bundle (tests/sdxl_fixtures.py)."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_random as build

    return build(tmp_path_factory, "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory):
    """The tiny random SD3 pipeline without text_encoder_3 (diffusers' text_encoder_3=None) and its bundle."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_random as build

    return build(tmp_path_factory, "tiny-sd3-no-t5")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    """The tiny random FLUX.1-schnell pipeline and its exported bundle (tests/sdxl_fixtures.py)."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_random as tiny_flux

    return tiny_flux(tmp_path_factory, "tiny-flux-schnell")


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory):
    """The tiny random FLUX.1-dev pipeline (guidance embedding, dynamic shifting) and its exported bundle."""
    pytest.importorskip("diffusers")
    from sdxl_fixtures import tiny_random as tiny_flux

    return tiny_flux(tmp_path_factory, "tiny-flux-dev")
