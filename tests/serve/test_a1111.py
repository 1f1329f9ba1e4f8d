"""The AUTOMATIC1111 shim over plain HTTP: txt2img and img2img answer {images, parameters, info} with the images
Pipeline gives alone for the mapped arguments (A1111 sampler names, cfg_scale, batch_size x n_iter, seed -1)."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from conftest import MODEL


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_txt2img_matches_the_pipeline(url, pipe):
    body = {"prompt": "a small red circle", "negative_prompt": "blue", "steps": 4, "cfg_scale": 6.0,
            "sampler_name": "Euler a", "seed": 21, "batch_size": 2, "n_iter": 1, "width": 48, "height": 64,
            "styles": [], "send_images": True, "save_images": False}  # bookkeeping fields UIs send: accepted
    r = httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert info["all_seeds"] == [21, 22] and info["sampler_name"] == "Euler a" and info["sd_model_name"] == MODEL
    assert out["parameters"]["steps"] == 4 and out["parameters"]["cfg_scale"] == 6.0
    alone = pipe("a small red circle", "blue", num_inference_steps=4, guidance_scale=6.0, scheduler="euler_a",
                 seed=21, num_images_per_prompt=2, width=48, height=64)
    assert [_decode(b).tobytes() for b in out["images"]] == [np.asarray(im).tobytes() for im in alone.images]


def test_karras_scheduler_and_random_seed(url):
    body = {"prompt": "a square", "steps": 3, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": -1}
    info = json.loads(httpx.post(url + "/sdapi/v1/txt2img", json=body, timeout=60).json()["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["seed"] >= 0


def test_img2img_keeps_the_init_size_and_matches_the_pipeline(url, pipe):
    init = pipe("a red circle", num_inference_steps=4, seed=5, width=48, height=48).images[0]
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()  # as browser UIs send it
    body = {"prompt": "a blue circle", "init_images": [data_url], "denoising_strength": 0.6, "steps": 6, "seed": 9,
            "override_settings": {"sd_model_checkpoint": MODEL}}
    r = httpx.post(url + "/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (img,) = r.json()["images"]
    alone = pipe("a blue circle", image=init, strength=0.6, num_inference_steps=6, seed=9).images[0]
    assert _decode(img).shape == (48, 48, 3)
    assert _decode(img).tobytes() == np.asarray(alone).tobytes()


def _b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_with_a_mask_inpaints_white_and_matches_the_pipeline(url, pipe):
    init = pipe("a red circle", num_inference_steps=4, seed=5).images[0]
    w, h = init.size
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (w // 2, 0, w, h))  # A1111: white is repainted
    body = {"prompt": "a green cross", "init_images": [_b64_png(init)], "mask": _b64_png(mask), "denoising_strength": 0.9,
            "steps": 6, "seed": 4}
    r = httpx.post(url + "/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    alone = pipe("a green cross", image=init, mask_image=mask, strength=0.9, num_inference_steps=6, seed=4).images[0]
    assert _decode(r.json()["images"][0]).tobytes() == np.asarray(alone).tobytes()


def test_listings(url):
    models = httpx.get(url + "/sdapi/v1/sd-models", timeout=30).json()
    assert [m["model_name"] for m in models] == [MODEL]
    names = [s["name"] for s in httpx.get(url + "/sdapi/v1/samplers", timeout=30).json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
