"""LoRA files -> layers (runtime/lora/formats.py) and layers -> model weights (runtime/lora/resolve.py), without
torch: the diffusers/PEFT and kohya formats, alpha from tensors / PEFT metadata / patterns / rsLoRA, the names
diffusers used before PEFT, and one line for every kind of file that is not a plain LoRA."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgediff.errors import InputError
from edgediff.lora.formats import read_lora
from edgediff.lora.fuse import delta, fused
from edgediff.lora.resolve import ModelTable, resolve

st_numpy = pytest.importorskip("safetensors.numpy")
rng = np.random.default_rng(0)
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def _save(path, tensors, metadata=None):
    st_numpy.save_file({k: np.asarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _pair(r=4, i=32, o=32, kernel=None):
    if kernel:
        return (rng.standard_normal((r, i, *kernel)).astype(np.float32),
                rng.standard_normal((o, r, 1, 1)).astype(np.float32))
    return rng.standard_normal((r, i)).astype(np.float32), rng.standard_normal((o, r)).astype(np.float32)


def _peft_meta(**cfg):
    return {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()})}


def test_diffusers_format_takes_alpha_from_peft_metadata_and_patterns(tmp_path):
    a, b = _pair()
    ca, cb = _pair(kernel=(3, 3))
    path = _save(tmp_path / "l.safetensors", {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b,
                                              f"unet.{CONV}.lora_A.weight": ca, f"unet.{CONV}.lora_B.weight": cb},
                 _peft_meta(r=4, lora_alpha=8, alpha_pattern={"resnets.0.conv1": 2}))
    layers = {layer.module: layer for layer in read_lora(path).layers}
    assert layers[Q].scale == 8 / 4 and layers[Q].component == "unet" and not layers[Q].kohya
    assert layers[CONV].scale == 2 / 4  # PEFT's alpha_pattern: a suffix of the module name
    assert np.array_equal(layers[Q].down, a) and np.array_equal(layers[CONV].up, cb)


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    a, b = _pair(r=9)
    path = _save(tmp_path / "l.safetensors", {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b},
                 _peft_meta(r=9, lora_alpha=6, use_rslora=True))
    assert read_lora(path).layers[0].scale == pytest.approx(6 / math.sqrt(9))


def test_without_alpha_the_scale_is_one(tmp_path):
    a, b = _pair(r=8)
    path = _save(tmp_path / "l.safetensors", {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b})
    assert read_lora(path).layers[0].scale == 1.0


def test_kohya_format_with_alpha_tensors_and_fp16_factors(tmp_path):
    a, b = _pair(r=4)
    key = "lora_unet_" + Q.replace(".", "_")
    path = _save(tmp_path / "k.safetensors", {f"{key}.lora_down.weight": a.astype(np.float16),
                                              f"{key}.lora_up.weight": b.astype(np.float16),
                                              f"{key}.alpha": np.array(2.0, np.float16),
                                              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
                                              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b})
    layers = {layer.component: layer for layer in read_lora(path).layers}
    assert layers["unet"].kohya and layers["unet"].scale == 0.5 and layers["unet"].down.dtype == np.float32
    assert layers["text_encoder"].scale == 1.0


def test_old_diffusers_processor_names_are_read(tmp_path):
    a, b = _pair()
    head = Q.rsplit(".", 1)[0]
    path = _save(tmp_path / "old.safetensors", {f"unet.{head}.processor.to_out_lora.down.weight": a,
                                                f"unet.{head}.processor.to_out_lora.up.weight": b})
    assert read_lora(path).layers[0].module == f"{head}.to_out.0"


@pytest.mark.parametrize("key,what", [
    (f"lora_unet_{Q.replace('.', '_')}.hada_w1_a", "LoHa"),
    (f"lora_unet_{Q.replace('.', '_')}.lokr_w1", "LoKr"),
    (f"lora_unet_{Q.replace('.', '_')}.lora_mid.weight", "Tucker"),
    (f"lora_unet_{Q.replace('.', '_')}.dora_scale", "DoRA"),
    (f"unet.{Q}.lora_magnitude_vector", "DoRA"),
    (f"lora_unet_{Q.replace('.', '_')}.diff", "full-weight difference"),
    ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "SD3/FLUX"),
    (f"unet.{Q}.something.weight", "is not a LoRA tensor"),
    (f"vae.{Q}.lora_A.weight", "names no component"),
])
def test_other_adapters_and_stray_keys_are_one_line(tmp_path, key, what):
    path = _save(tmp_path / "x.safetensors", {key: np.ones((4, 4), np.float32)})
    with pytest.raises(InputError, match=what) as info:
        read_lora(path)
    assert "\n" not in str(info.value) and "x.safetensors" in str(info.value)


@pytest.mark.parametrize("case,match", [
    ("rank", "rank 4 but lora_up rank 3"),
    ("missing_up", "no up tensor"),
    ("nan", "NaN/Inf"),
    ("int", "floating point"),
    ("kernel_up", "kernel"),
])
def test_broken_layers_are_one_line(tmp_path, case, match):
    a, b = _pair()
    t = {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b}
    if case == "rank":
        t[f"unet.{Q}.lora_B.weight"] = b[:, :3]
    elif case == "missing_up":
        del t[f"unet.{Q}.lora_B.weight"]
    elif case == "nan":
        a[0, 0] = np.nan
    elif case == "int":
        t[f"unet.{Q}.lora_A.weight"] = a.astype(np.int32)
    elif case == "kernel_up":
        t[f"unet.{Q}.lora_B.weight"] = np.ones((32, 4, 3, 3), np.float32)
    with pytest.raises(InputError, match=match):
        read_lora(_save(tmp_path / "x.safetensors", t))


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(InputError, match="pickle"):
        read_lora(path)


def _tables():
    unet = {f"{Q}.weight": (32, 32), f"{CONV}.weight": (32, 32, 3, 3),
            "down_blocks.0.attentions.0.proj_in.weight": (32, 32, 1, 1)}
    te = {"encoder.layers.0.mlp.fc1.weight": (37, 32)}
    return {"unet": ModelTable("unet", unet), "text_encoder": ModelTable("text_encoder", te)}


def test_kohya_and_diffusers_names_resolve_to_the_same_weights(tmp_path):
    a, b = _pair()
    ta, tb = _pair(o=37)
    kq = "lora_unet_" + Q.replace(".", "_")
    dif = _save(tmp_path / "d.safetensors", {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b,
                                             "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": ta,
                                             "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": tb})
    koh = _save(tmp_path / "k.safetensors", {f"{kq}.lora_down.weight": a, f"{kq}.lora_up.weight": b,
                                             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": ta,
                                             "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": tb})
    for path in (dif, koh):
        hits = {h.param for h in resolve(read_lora(path), _tables(), model="this sd1 bundle")}
        assert hits == {f"{Q}.weight", "encoder.layers.0.mlp.fc1.weight"}


def test_a_linear_lora_fits_a_one_by_one_convolution(tmp_path):
    a, b = _pair()
    m = "down_blocks.0.attentions.0.proj_in"
    path = _save(tmp_path / "l.safetensors", {f"unet.{m}.lora_A.weight": a, f"unet.{m}.lora_B.weight": b})
    (hit,) = resolve(read_lora(path), _tables(), model="x")
    assert delta(hit.layer, hit.shape).shape == (32, 32, 1, 1)


def test_unmatched_layers_are_named_and_shapes_checked(tmp_path):
    a, b = _pair()
    t = {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b}
    for i in range(5):
        t[f"unet.up_blocks.9.attentions.{i}.to_q.lora_A.weight"] = a
        t[f"unet.up_blocks.9.attentions.{i}.to_q.lora_B.weight"] = b
    with pytest.raises(InputError, match=r"5 of its 6 layers match no layer of this sd1 bundle \(first: "
                                         r"'unet\.up_blocks\.9\.attentions\.0\.to_q', .*, \.\.\.\)"):
        resolve(read_lora(_save(tmp_path / "u.safetensors", t)), _tables(), model="this sd1 bundle")
    wide_a, wide_b = _pair(i=48)
    bad = _save(tmp_path / "s.safetensors", {f"unet.{Q}.lora_A.weight": wide_a, f"unet.{Q}.lora_B.weight": wide_b})
    with pytest.raises(InputError, match=r"is \(32, 48\) in the LoRA but \(32, 32\) in this sd1 bundle's unet"):
        resolve(read_lora(bad), _tables(), model="this sd1 bundle")
    sdxl = _save(tmp_path / "x.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": a,
                                              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": b})
    with pytest.raises(InputError, match="has text_encoder_2 layers .*an SDXL LoRA"):
        resolve(read_lora(sdxl), _tables(), model="this sd1 bundle")


def test_fused_is_base_plus_scaled_products_and_never_writes_the_base():
    a, b = _pair(kernel=(3, 3))
    from edgediff.lora.formats import LoraLayer

    layer = LoraLayer("unet", CONV, False, a, b, 0.5)
    base = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    base.flags.writeable = False
    out = fused(base, [(layer, 0.5), (layer, 0.25)], base.shape)
    expect = base + 0.75 * np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    assert np.allclose(out, expect, atol=1e-5) and out is not base


def test_fused_in_the_stored_transposed_layout_equals_the_transposed_pytorch_layout():
    # A Linear exported as MatMul stores W^T (in, out); its fused weight is computed in that layout directly.
    from edgediff.lora.formats import LoraLayer

    a = rng.standard_normal((4, 48)).astype(np.float32)  # lora_A / down: (r, in)
    b = rng.standard_normal((32, 4)).astype(np.float32)  # lora_B / up: (out, r)
    layer = LoraLayer("unet", Q, False, a, b, 0.5)
    base = rng.standard_normal((32, 48)).astype(np.float32)  # PyTorch layout (out, in)
    stored = np.ascontiguousarray(base.T)
    stored.flags.writeable = False
    out = fused(stored, [(layer, 0.5), (layer, 0.25)], base.shape, transposed=True)
    assert out.shape == (48, 32) and out.flags.c_contiguous
    assert np.allclose(out, fused(base, [(layer, 0.5), (layer, 0.25)], base.shape).T, atol=1e-5)
    assert np.allclose(out, (base + 0.75 * b @ a).T, atol=1e-5)
