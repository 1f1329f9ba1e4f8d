"""DeepCache export (export/components_deepcache.py): the full UNet with the cached feature and the shallow UNet.

Reference: the DeepCache package (``DeepCache==0.1.1``, ``DeepCacheSDHelper``) wrapping the same diffusers UNet: a
first call (full, it caches every module's output) and a second call at the next timestep with interval 2 (cached:
the modules below the branch return their cached outputs). Our torch modules must give the helper's outputs to the
bit; the ONNX graphs must give them within max_rel 1e-4 (the exporter's fp32 parity bar).
"""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.bundle.reader import Bundle
from edgediff.cli import main
from edgediff.errors import ExportError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("DeepCache")

from deepcache_fixtures import deepcache_helper, tiny_unet_lpb2, unet_driver  # noqa: E402

BRANCHES = (0, 4)


def _load_unet(source):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet").eval()
    unet.set_default_attn_processor()
    unet.requires_grad_(False)
    return unet


def _tiny_sd1_unet(source):
    return _load_unet(source)


def _inputs(unet, seed: int, batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return (torch.randn(batch, cfg.in_channels, size, size, generator=g),
            torch.randn(batch, 77, cfg.cross_attention_dim, generator=g))


def _reference(unet, branch: int, a, b, t=(901.0, 801.0), a_kw=None, b_kw=None):
    """The helper's two UNet calls (full, then cached) on inputs a and b (``*_kw``: added conditioning)."""
    with deepcache_helper(unet_driver(unet, list(t)), 2, branch), torch.no_grad():
        full = unet(a[0], torch.tensor(t[0]), encoder_hidden_states=a[1], return_dict=False, **(a_kw or {}))[0]
        cached = unet(b[0], torch.tensor(t[1]), encoder_hidden_states=b[1], return_dict=False, **(b_kw or {}))[0]
    return full.numpy(), cached.numpy()


@pytest.fixture(scope="module")
def tiny_sdxl_source(tmp_path_factory):
    from edgediff.export.random_pipeline import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("src") / "tiny-sdxl", "tiny-sdxl", seed=0)


@pytest.mark.parametrize("kind", ["sd1-2-layers", "sd1", "sdxl", "lcm"])
def test_torch_modules_equal_the_reference_helper_on_every_branch(request, kind):
    """SD's UNets have 2 layers per block, the conftest's tiny one 1; SDXL's takes the added text/time embedding and
    an LCM's the guidance embedding (the plan's own unet row's inputs): every branch id of each, to the bit."""
    from edgediff.export.components import Geometry
    from edgediff.export.components_deepcache import _conditioning, _modules
    from edgediff.export.plan import export_plan
    from edgediff.export.source import inspect_source

    Full, Shallow = _modules()
    fixture = {"sd1-2-layers": "tiny_sd1_source", "sd1": "tiny_sd1_source", "sdxl": "tiny_sdxl_source",
               "lcm": "tiny_lcm_source"}[kind]
    source = request.getfixturevalue(fixture)
    unet = tiny_unet_lpb2() if kind == "sd1-2-layers" else _load_unet(source)
    row = export_plan(inspect_source(source)).rows["unet"]
    extra = row.input_names[3:]
    a, b = (row.inputs({"unet": unet}, Geometry(2, 16, 16, 77), torch.Generator().manual_seed(s)) for s in (1, 2))

    def kwargs(x):
        cond, added = _conditioning(extra, x[3:])
        return {**({"timestep_cond": cond} if cond is not None else {}),
                **({"added_cond_kwargs": added} if added else {})}

    assert len(extra) == {"sd1-2-layers": 0, "sd1": 0, "sdxl": 2, "lcm": 1}[kind]
    for branch in range(3 * len(unet.down_blocks)):
        ref_full, ref_cached = _reference(unet, branch, (a[0], a[2]), (b[0], b[2]), a_kw=kwargs(a), b_kw=kwargs(b))
        with torch.no_grad():
            eps, feature = Full(unet, (branch,), extra)(a[0], torch.full((2,), 901.0), *a[2:])
            shallow = Shallow(unet, branch, extra)(b[0], torch.full((2,), 801.0), *b[2:], feature)
            plain = unet(b[0], torch.tensor(801.0), encoder_hidden_states=b[2], return_dict=False, **kwargs(b))[0]
        np.testing.assert_array_equal(eps.numpy(), ref_full)
        np.testing.assert_array_equal(shallow.numpy(), ref_cached, err_msg=f"branch {branch}")
        assert np.abs(shallow.numpy() - plain.numpy()).max() > 1e-3  # the cached feature really is used


@pytest.fixture(scope="module")
def dc_bundle(tiny_sd1_source, tmp_path_factory):
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(tiny_sd1_source, tmp_path_factory.mktemp("dc") / "b", deepcache="4,0")


def _session(bundle, name):
    import onnxruntime as ort

    return ort.InferenceSession(str(Bundle.open(bundle).root / name / "model.onnx"),
                                providers=["CPUExecutionProvider"])


def _max_rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_bundle_holds_full_and_shallow_graphs_with_passing_receipts(dc_bundle):
    m = Bundle.open(dc_bundle).manifest
    full = m.components["unet_deepcache_full"]
    assert [s.name for s in full.outputs] == ["out_sample", "deep_feature_0", "deep_feature_4"]
    for name in ("unet_deepcache_full", "unet_deepcache_shallow_0", "unet_deepcache_shallow_4"):
        r = m.components[name].parity
        assert r is not None and r.passed and r.max_rel <= 1e-4, (name, r)
    assert [s.name for s in m.components["unet_deepcache_shallow_4"].inputs] == [
        "sample", "timestep", "encoder_hidden_states", "deep_feature"]
    # the plain UNet stays what it was: the default denoiser, its own three inputs and one output
    unet = m.components["unet"]
    assert Bundle.open(dc_bundle).denoiser == "unet"
    assert [s.name for s in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert [s.name for s in unet.outputs] == ["out_sample"]
    assert "unet_deepcache_shallow_1" not in m.components


@pytest.mark.parametrize("branch", BRANCHES)
def test_onnx_graphs_match_the_reference_helper(tiny_sd1_source, dc_bundle, branch):
    """ORT's full graph (noise prediction and feature) then ORT's shallow graph fed that feature, vs the helper's
    full and cached calls, at the exporter's 1e-4; at a size and batch other than the trace's."""
    unet = _tiny_sd1_unet(tiny_sd1_source)
    a, b = _inputs(unet, 5, batch=1, size=16), _inputs(unet, 6, batch=1, size=16)
    ref_full, ref_cached = _reference(unet, branch, a, b)
    full = _session(dc_bundle, "unet_deepcache_full")
    eps, *features = full.run(None, {"sample": a[0].numpy(), "timestep": np.full((1,), 901.0, np.float32),
                                     "encoder_hidden_states": a[1].numpy()})
    feature = features[[o.name for o in full.get_outputs()].index(f"deep_feature_{branch}") - 1]
    assert _max_rel(eps, ref_full) <= 1e-4
    shallow = _session(dc_bundle, f"unet_deepcache_shallow_{branch}")
    out = shallow.run(None, {"sample": b[0].numpy(), "timestep": np.full((1,), 801.0, np.float32),
                             "encoder_hidden_states": b[1].numpy(), "deep_feature": feature})[0]
    assert _max_rel(out, ref_cached) <= 1e-4


def test_refusals_are_one_line_before_any_model_loads(tiny_sd1_source, tmp_path):
    from edgediff.export.components_deepcache import check_unet, parse_branches
    from edgediff.export.pipeline_export import export_pipeline

    cfg = {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}
    assert parse_branches("3, 0,3", cfg) == (0, 3)
    for spec, match in (("6", "branch ids 0 to 5"), ("x", "not a branch id"), ("", "not a branch id"),
                        ("-1", "branch ids 0 to 5")):
        with pytest.raises(ExportError, match=match):
            parse_branches(spec, cfg)
    check_unet({"addition_embed_type": "text_time", "time_cond_proj_dim": 256})  # SDXL's and LCM's: wired
    with pytest.raises(ExportError, match="addition_embed_type='image', not wired"):
        check_unet({"addition_embed_type": "image"})
    with pytest.raises(ExportError, match="class_embed_type='timestep'"):
        check_unet({"class_embed_type": "timestep"})
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="branch ids 0 to 5"):
        export_pipeline(tiny_sd1_source, out, deepcache="7")
    assert not out.exists()
    r = CliRunner().invoke(main, ["export", str(tiny_sd1_source), str(out), "--deepcache", "0,9"])
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and lines[-1].startswith("error: --deepcache branch 9"), r.output
    assert not out.exists()
