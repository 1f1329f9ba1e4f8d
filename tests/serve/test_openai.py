"""The OpenAI Images routes, driven by the real ``openai`` client: generations (b64_json and url, png/jpeg/webp,
n > 1, the SD knobs through extra_body), edits (img2img from an upload), the model list, and SSE progress."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import MODEL, STEPS

openai = pytest.importorskip("openai", reason="the real openai client (the [dev] extra)")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_generate_b64_png_with_sd_knobs(client):
    res = client.images.generate(prompt="a small red circle", model=MODEL, n=2, size="64x48",
                                 extra_body={"num_inference_steps": STEPS, "guidance_scale": 4.0, "seed": 11,
                                             "negative_prompt": "blue", "scheduler": "euler"})
    assert res.created > 0 and len(res.data) == 2
    assert [d.seed for d in res.data] == [11, 12]  # image k has seed + k: each one reproducible alone
    for d in res.data:
        png = base64.b64decode(d.b64_json)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        im = _image(png)
        assert im.size == (64, 48)
        params = json.loads(im.text["parameters"])  # what produced it, as `edgediff generate` writes it
        assert params["steps"] == STEPS and params["scheduler"] == "euler" and params["model"] == MODEL


def test_speed_levers_per_request_give_the_pipelines_image(client, pipe):
    """A request's cfg_cutoff reaches the pipeline as Pipeline.__call__'s own keyword: the same image, to the byte,
    and a different one from the plain request (the lever changed the work)."""
    kw = dict(prompt="a small red circle", size="64x64")
    body = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "seed": 5}

    def served(**more):
        png = base64.b64decode(client.images.generate(**kw, extra_body={**body, **more}).data[0].b64_json)
        return np.asarray(_image(png).convert("RGB"))

    direct = pipe("a small red circle", height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, seed=5,
                  cfg_cutoff=0.5).images[0]
    cut = served(cfg_cutoff=0.5)
    assert np.array_equal(cut, np.asarray(direct.convert("RGB")))
    assert not np.array_equal(cut, served())


def test_url_response_serves_the_same_image_until_it_expires(client, url):
    kw = dict(prompt="a blue square", size="64x64", extra_body={"num_inference_steps": STEPS, "seed": 3})
    by_url = client.images.generate(response_format="url", **kw).data[0].url
    assert by_url.startswith(url + "/v1/files/")
    fetched = httpx.get(by_url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    inline = base64.b64decode(client.images.generate(response_format="b64_json", **kw).data[0].b64_json)
    assert fetched.content == inline
    missing = httpx.get(url + "/v1/files/not-a-file", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_formats(client, fmt, magic):
    res = client.images.generate(prompt="a green triangle", output_format=fmt, output_compression=80,
                                 extra_body={"num_inference_steps": 2, "seed": 1})
    data = base64.b64decode(res.data[0].b64_json)
    assert data.startswith(magic) and _image(data).format == fmt.upper()


def test_edit_is_img2img_of_the_upload(client, pipe):
    init = pipe("a red circle", num_inference_steps=STEPS, seed=5).images[0]
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    res = client.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt="a blue circle", model=MODEL,
                             extra_body={"strength": 0.5, "num_inference_steps": 8, "seed": 2})
    out = _image(base64.b64decode(res.data[0].b64_json))
    assert out.size == init.size
    alone = pipe("a blue circle", image=init, strength=0.5, num_inference_steps=8, seed=2).images[0]
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(alone))


def test_edit_with_a_mask_inpaints_its_transparent_pixels(client, pipe):
    """OpenAI's mask: fully transparent pixels are edited. The same edit as Pipeline inpainting with the diffusers
    mask (white = repaint), to the bit; a mask of another size is a 400 naming the field."""
    init = pipe("a red circle", num_inference_steps=STEPS, seed=5).images[0]
    w, h = init.size
    rgba = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, w // 2, h))  # the left half transparent: edit it
    buf, mbuf = io.BytesIO(), io.BytesIO()
    init.save(buf, format="PNG")
    rgba.save(mbuf, format="PNG")
    res = client.images.edit(image=("init.png", buf.getvalue(), "image/png"), mask=("m.png", mbuf.getvalue(),
                             "image/png"), prompt="a blue square", model=MODEL,
                             extra_body={"strength": 0.9, "num_inference_steps": 6, "seed": 3})
    out = _image(base64.b64decode(res.data[0].b64_json))
    diffusers_mask = Image.new("L", (w, h), 0)
    diffusers_mask.paste(255, (0, 0, w // 2, h))
    alone = pipe("a blue square", image=init, mask_image=diffusers_mask, strength=0.9, num_inference_steps=6,
                 seed=3).images[0]
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(alone))
    small = io.BytesIO()
    Image.new("RGBA", (w // 2, h // 2), (0, 0, 0, 0)).save(small, format="PNG")
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("i.png", buf.getvalue(), "image/png"), mask=("m.png", small.getvalue(),
                           "image/png"), prompt="x", extra_body={"num_inference_steps": 2})
    assert err.value.status_code == 400 and err.value.body["param"] == "mask"


def test_models_lists_the_loaded_bundles(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["size_multiple"] == 16


def test_stream_sends_progress_then_the_image(url):
    body = {"prompt": "a cross", "stream": True, "num_inference_steps": 5, "seed": 4}
    events = []
    with httpx.stream("POST", url + "/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    progress = [e for e in events if e["type"] == "edgediff.progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5] and progress[-1]["total"] == 5
    (done,) = [e for e in events if e["type"] == "image_generation.completed"]
    assert events[-1] is done and done["seed"] == 4
    assert base64.b64decode(done["b64_json"])[:4] == b"\x89PNG"


def test_openai_client_streams_too(client):
    stream = client.images.generate(prompt="a cross", stream=True, extra_body={"num_inference_steps": 3, "seed": 4})
    types = [event.type for event in stream]
    assert types == ["edgediff.progress"] * 3 + ["image_generation.completed"]
