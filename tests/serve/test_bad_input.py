"""Every bad field a client can send gets 400 and OpenAI's error JSON naming that field; no route answers a bad
request with a 500 or a traceback. The JSON routes, the edits form and the A1111 shim share one field reader
(serve/fields.py), so each kind of mistake is tried on each of them."""
from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

GEN = "/v1/images/generations"
ok = {"prompt": "a red circle", "num_inference_steps": 2}


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return buf.getvalue()


def _assert_openai_error(r: httpx.Response, param, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("change,param", [
    ({"size": "65x64"}, "size"),  # not a multiple of the model's 16
    ({"size": "64"}, "size"),
    ({"size": "0x64"}, "size"),
    ({"size": "4096x64"}, "size"),  # over the server's max side
    ({"size": 64}, "size"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"n": "2"}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"model": "no-such-model"}, "model"),
    ({"model": 3}, "model"),
    ({"prompt": "x" * 5000}, "prompt"),  # huge prompt
    ({"prompt": None}, "prompt"),  # missing
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"negative_prompt": 7}, "negative_prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 10_000}, "num_inference_steps"),
    ({"num_inference_steps": "4"}, "num_inference_steps"),
    ({"guidance_scale": "high"}, "guidance_scale"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"scheduler": "euler_b"}, "scheduler"),
    ({"response_format": "gif"}, "response_format"),
    ({"output_format": "bmp"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"background": "transparent"}, "background"),
    ({"partial_images": 2}, "partial_images"),
    ({"stream": "yes"}, "stream"),
    ({"user": {"id": 1}}, "user"),
    ({"num_steps": 4}, "num_steps"),  # a misspelt knob is refused, not ignored
    ({"cfg_cutoff": 1.5}, "cfg_cutoff"),  # the speed levers, per request
    ({"cfg_cutoff": "half"}, "cfg_cutoff"),
    ({"decoder": "small"}, "decoder"),
    ({"vae_tiling": "yes"}, "vae_tiling"),
    ({"vae_tile_size": "big"}, "vae_tile_size"),
    ({"vae_tile_size": 100}, "vae_tile_size"),  # not a multiple of 4 latent cells: the pipeline says so
    ({"vae_tile_size": 64, "vae_tiling": False}, "vae_tile_size"),
    ({"cache_interval": 0}, "cache_interval"),
    ({"cache_interval": 3}, "cache_interval"),  # the built-in bundle has no DeepCache graphs: the pipeline says so
    ({"cache_branch": -1}, "cache_branch"),
    ({"cache_schedule": "poisson"}, "cache_schedule"),
    ({"cache_schedule": "quadratic"}, "cache_schedule"),  # without cache_interval: the pipeline says so
    ({"cache_center": -1}, "cache_center"),
    ({"cache_pow": "steep"}, "cache_pow"),
    ({"preset": "turbo"}, "preset"),
])
def test_generations_bad_field(url, change, param):
    body = {**ok, **change}
    if change.get("prompt", "") is None:
        del body["prompt"]
    _assert_openai_error(httpx.post(url + GEN, json=body, timeout=30), param)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_generations_body_that_is_not_a_json_object(url, content):
    r = httpx.post(url + GEN, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert _assert_openai_error(r, None)["code"] == "invalid_json"


@pytest.mark.parametrize("files,data,param", [
    ({"image": ("x.png", b"this is not an image", "image/png")}, {"prompt": "x"}, "image"),  # non-image upload
    ({"image": ("x.png", b"", "image/png")}, {"prompt": "x"}, "image"),
    ({}, {"prompt": "x"}, "image"),  # missing
    ({"image": ("x.png", _png(), "image/png")}, {}, "prompt"),
    ({"image": ("x.png", _png(), "image/png"), "mask": ("m.png", b"not a png", "image/png")}, {"prompt": "x"}, "mask"),
    ({"image": ("x.png", _png(), "image/png")}, {"prompt": "x", "strength": "0"}, "strength"),
    ({"image": ("x.png", _png(), "image/png")}, {"prompt": "x", "strength": "lots"}, "strength"),
    ({"image": ("x.png", _png(), "image/png")}, {"prompt": "x", "n": "0"}, "n"),
    ({"image": ("x.png", _png(), "image/png")}, {"prompt": "x", "size": "60x60"}, "size"),
    ({"image": ("x.png", _png((8, 8)), "image/png")}, {"prompt": "x"}, "image"),  # smaller than the latent grid
    ({"image": ("x.png", _png(), "image/png")}, {"prompt": "x", "model": "nope"}, "model"),
])
def test_edits_bad_field(url, files, data, param):
    r = httpx.post(url + "/v1/images/edits", files=files or {"unrelated": ("u", b"u")}, data=data, timeout=30)
    _assert_openai_error(r, param)


def test_edits_image_sent_as_text_is_refused(url):
    r = httpx.post(url + "/v1/images/edits", files={"other": ("o", b"o")},
                   data={"prompt": "x", "image": base64.b64encode(_png()).decode()}, timeout=30)
    _assert_openai_error(r, "image")


@pytest.mark.parametrize("route,change,param", [
    ("txt2img", {"width": 65}, "width"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"cfg_scale": "7"}, "cfg_scale"),
    ("txt2img", {"sampler_name": "Heun"}, "sampler_name"),
    ("txt2img", {"batch_size": 0}, "batch_size"),
    ("txt2img", {"batch_size": 4, "n_iter": 4}, "n_iter"),
    ("txt2img", {"seed": "random"}, "seed"),
    ("txt2img", {"enable_hr": True}, "enable_hr"),
    ("txt2img", {"alwayson_scripts": {"controlnet": {}}}, "alwayson_scripts"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ("txt2img", {"prompt": "x" * 5000}, "prompt"),
    ("img2img", {"init_images": ["%%% not base64 %%%"]}, "init_images"),  # bad base64
    ("img2img", {"init_images": [base64.b64encode(b"plain text, not an image").decode()]}, "init_images"),
    ("img2img", {"init_images": "abc"}, "init_images"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"denoising_strength": 0}, "denoising_strength"),
    ("img2img", {"width": 60, "height": 64}, "width"),  # refused, not resized then rounded down
    ("img2img", {"mask": "%%% not base64 %%%"}, "mask"),
    ("img2img", {"mask": base64.b64encode(_png((32, 32))).decode()}, "mask"),  # not the init image's size
])
def test_a1111_bad_field(url, route, change, param):
    body = {"prompt": "a red circle", "steps": 2}
    if route == "img2img":
        body["init_images"] = [base64.b64encode(_png()).decode()]
    body.update(change)
    _assert_openai_error(httpx.post(f"{url}/sdapi/v1/{route}", json=body, timeout=30), param)


def test_unknown_route_and_wrong_method_are_openai_errors(url):
    assert _assert_openai_error(httpx.get(url + "/v1/nope", timeout=30), None, 404)["code"] == "not_found"
    assert _assert_openai_error(httpx.get(url + GEN, timeout=30), None, 405)["code"] == "method_not_allowed"
