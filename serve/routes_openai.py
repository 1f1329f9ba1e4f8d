"""OpenAI Images routes: ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart, img2img).

Request fields are OpenAI's (prompt, model, n, size "WIDTHxHEIGHT" or "auto", response_format b64_json | url,
output_format png | jpeg | webp, output_compression, user) plus Stable Diffusion's knobs as extra top-level fields,
which is what the ``openai`` client sends through ``extra_body``: negative_prompt, num_inference_steps,
guidance_scale, seed, scheduler, strength for edits, and the speed levers cfg_cutoff, decoder ("tiny"),
vae_tiling, vae_tile_size, cache_interval, cache_branch, cache_schedule ("uniform" | "quadratic"), cache_center,
cache_pow (DeepCache) and preset ("lcm"). A field left out takes the model's own default (its
recommended steps, guidance, scheduler and size: GET /v1/models). OpenAI fields that have no meaning here are
accepted and ignored (quality, style, moderation, safety_identifier) or refused when they ask for something this
server cannot do (background="transparent", partial_images > 0). Any other field is refused by name.

Responses: ``{"created", "output_format", "size", "data": [{"b64_json" | "url", "seed"}]}``; ``seed`` (an extra
field) is each image's seed, which reproduces it. response_format defaults to b64_json; "url" points at
``GET /v1/files/{id}``, kept in memory for a few minutes (serve/files.py).

Progress: ``"stream": true`` answers with server-sent events: ``edgediff.progress`` ({"step", "total"}) after each
denoising step, then one ``image_generation.completed`` event per image (OpenAI's streaming event, with b64_json),
or one ``error`` event.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from edgediff.schedulers import SCHEDULERS

from . import images
from .errors import ApiError, bad_request
from .fields import Fields, parse_size
from .state import build_request, check_multiple, run_ticket

router = APIRouter()

# the runtime's speed levers, per request (issue 18): each the keyword Pipeline.__call__ takes
SPEED = ("cfg_cutoff", "decoder", "vae_tiling", "vae_tile_size", "cache_interval", "cache_branch", "cache_schedule",
         "cache_center", "cache_pow", "preset")
# runtime argument name (the start of its InputError messages) -> this API's field name
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "num_inference_steps",
          "guidance_scale": "guidance_scale", "height": "size", "width": "size", "num_images_per_prompt": "n",
          "seed": "seed", "scheduler": "scheduler", "strength": "strength", "image": "image", "init": "image",
          "mask_image": "mask", "mask": "mask", **{k: k for k in SPEED}}
COMMON = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "user",
          "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "scheduler", "background",
          "partial_images", "stream", *SPEED)
IGNORED = ("quality", "style", "moderation", "safety_identifier")  # OpenAI's, without an equivalent here


@router.post("/v1/images/generations")
async def generations(request: Request):
    t0 = time.perf_counter()
    state = request.app.state.edgediff
    body = await _json_object(request)
    f = Fields(body, allowed=COMMON, ignored=IGNORED)
    engine = state.engine(f.string("model"))
    knobs, out = _read(f, state, engine)
    req = build_request(engine, FIELDS, **knobs)
    if out["stream"]:
        return _stream(state, engine, req, out, knobs["prompt"])
    ticket, result = await run_ticket(state, engine, req, request, FIELDS)
    return await _respond(state, engine, request, result, out, knobs["prompt"], t0)


@router.post("/v1/images/edits")
async def edits(request: Request):
    t0 = time.perf_counter()
    state = request.app.state.edgediff
    form = await request.form(max_files=4, max_fields=64, max_part_size=state.limits.max_body_bytes)
    uploads = form.getlist("image") + form.getlist("image[]")
    if not uploads:
        raise bad_request("image is required: a PNG, JPEG or WebP file (multipart field 'image')", "image",
                          code="missing_required_parameter")
    if len(uploads) > 1:
        raise bad_request(f"image: {len(uploads)} images were sent; img2img takes one", "image")
    if not isinstance(uploads[0], UploadFile):
        raise bad_request("image must be a file upload (multipart), not a text field", "image", code="invalid_type")
    masks = form.getlist("mask")
    if len(masks) > 1 or (masks and not isinstance(masks[0], UploadFile)):
        raise bad_request("mask must be one file upload (a PNG whose transparent pixels mark what to edit)", "mask",
                          code="invalid_type")
    texts = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
    f = Fields(texts, form=True, allowed=COMMON + ("strength",), ignored=IGNORED + ("input_fidelity",))
    engine = state.engine(f.string("model"))
    if not engine.pipe.bundle.has("vae_encoder"):
        raise bad_request(f"model {engine.name!r} has no VAE encoder, so it cannot edit images; use another model",
                          "model", code="unsupported_model")
    knobs, out = _read(f, state, engine)
    size = (knobs.pop("height"), knobs.pop("width"))
    check_multiple(engine, size, ("size", "size"))
    picture = images.open_image(await uploads[0].read(), "image")
    knobs["image"] = images.fit(picture, None if size[0] is None else size)  # a size asked for: the image resized
    if masks:  # inpainting: the transparent pixels are edited, the rest kept (the runtime checks the sizes match)
        mask = images.open_mask(await masks[0].read(), "mask")
        knobs["mask_image"] = images.fit(mask, None if size[0] is None else size)
    knobs["strength"] = f.number("strength", lo=0.0, hi=1.0)
    req = build_request(engine, FIELDS, **knobs)
    if out["stream"]:
        return _stream(state, engine, req, out, knobs["prompt"])
    ticket, result = await run_ticket(state, engine, req, request, FIELDS)
    return await _respond(state, engine, request, result, out, knobs["prompt"], t0)


# -- reading ------------------------------------------------------------------------------------------------------
async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad_request("the request body is not valid JSON; send a JSON object with Content-Type: "
                          "application/json", None, code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}", None,
                          code="invalid_json")
    return body


def _read(f: Fields, state, engine) -> tuple[dict, dict]:
    """The pipeline's keyword arguments and the output options, each field checked against the server's limits."""
    lim = state.limits
    prompt = f.string("prompt", required=True, max_chars=lim.max_prompt_chars)
    size = parse_size(f.string("size", "auto"))
    if size is not None and max(size) > lim.max_side:
        raise bad_request(f"size={f.string('size')!r}; each side must be at most {lim.max_side} pixels on this "
                          "server", "size")
    if f.string("background", "auto", choices=("auto", "opaque", "transparent")) == "transparent":
        raise bad_request("background='transparent' is not supported: the models draw opaque images", "background",
                          code="unsupported_parameter")
    if f.integer("partial_images", 0, lo=0, hi=3):
        raise bad_request("partial_images is not supported; stream=true sends edgediff.progress events after each "
                          "step instead", "partial_images", code="unsupported_parameter")
    f.string("user", max_chars=256)
    knobs = dict(prompt=prompt,
                 negative_prompt=f.string("negative_prompt", max_chars=lim.max_prompt_chars),
                 num_inference_steps=f.integer("num_inference_steps", lo=1, hi=lim.max_steps),
                 guidance_scale=f.number("guidance_scale", lo=0.0, hi=100.0),
                 num_images_per_prompt=f.integer("n", 1, lo=1, hi=lim.max_images),
                 seed=f.integer("seed", lo=0, hi=2**63 - 1),
                 scheduler=f.string("scheduler", choices=list(SCHEDULERS)),
                 height=None if size is None else size[0], width=None if size is None else size[1],
                 **speed_options(f, lim))
    out = dict(response_format=f.string("response_format", "b64_json", choices=("b64_json", "url")),
               output_format=f.string("output_format", "png", choices=images.OUTPUT_FORMATS),
               quality=f.integer("output_compression", lo=0, hi=100),
               stream=f.boolean("stream", False))
    return knobs, out


def speed_options(f: Fields, lim) -> dict:
    """The speed levers a request names (only those: a field left out keeps the pipeline's default, so a plain
    request runs the plain path). Whether the model can take one (a tiny decoder, DeepCache graphs, an LCM-LoRA for
    the preset) is the pipeline's check, answered as a 400 naming the field."""
    from edgediff.deepcache import SCHEDULES
    from edgediff.presets import PRESETS

    given = dict(cfg_cutoff=f.number("cfg_cutoff", lo=0.0, hi=1.0),
                 decoder=f.string("decoder", choices=("full", "tiny")),
                 vae_tiling=f.boolean("vae_tiling"),
                 vae_tile_size=f.integer("vae_tile_size", lo=1, hi=1 << 16),
                 cache_interval=f.integer("cache_interval", lo=1, hi=lim.max_steps),
                 cache_branch=f.integer("cache_branch", lo=0, hi=64),
                 cache_schedule=f.string("cache_schedule", choices=SCHEDULES),
                 cache_center=f.integer("cache_center", lo=0, hi=lim.max_steps),
                 cache_pow=f.number("cache_pow", hi=1e3),  # > 1: the pipeline's check names the field
                 preset=f.string("preset", choices=sorted(PRESETS)))
    return {k: v for k, v in given.items() if v is not None}


# -- answering ----------------------------------------------------------------------------------------------------
def _files(engine, result, out, prompt) -> list[bytes]:
    backend = engine.pipe.components.backend
    return [images.encode(im, out["output_format"],
                          result.image_parameters(k, prompt=prompt, rng="numpy", backend=backend, model=engine.name),
                          out["quality"])
            for k, im in enumerate(result.images)]


async def _respond(state, engine, request: Request, result, out: dict, prompt: str, t0: float) -> dict:
    e0 = time.perf_counter()
    datas = await run_in_threadpool(_files, engine, result, out, prompt)
    state.metrics.stage_seconds.observe(time.perf_counter() - e0, model=engine.name, stage="encode")
    items = []
    for k, data in enumerate(datas):
        if out["response_format"] == "url":
            file_id = state.files.put(data, images.MEDIA_TYPES[out["output_format"]])
            items.append({"url": str(request.url_for("file", file_id=file_id)), "seed": result.seeds[k]})
        else:
            items.append({"b64_json": images.b64(data), "seed": result.seeds[k]})
    state.metrics.images.inc(len(items), model=engine.name)
    state.metrics.stage_seconds.observe(time.perf_counter() - t0, model=engine.name, stage="total")
    p = result.parameters
    return {"created": int(time.time()), "output_format": out["output_format"],
            "size": f"{p['width']}x{p['height']}", "data": items}


def _stream(state, engine, req, out: dict, prompt: str) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()

    def progress(i: int, total: int) -> None:  # on the engine thread
        loop.call_soon_threadsafe(steps.put_nowait, (i, total))

    async def events():
        task = asyncio.ensure_future(run_ticket(state, engine, req, None, FIELDS, progress))
        try:
            while not task.done():
                nxt = asyncio.ensure_future(steps.get())
                done, _ = await asyncio.wait({task, nxt}, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    i, total = nxt.result()
                    yield _sse("edgediff.progress", {"step": i, "total": total})
                else:
                    nxt.cancel()
            try:
                _, result = task.result()
            except ApiError as exc:
                state.metrics.errors.inc(kind=exc.kind)
                yield _sse("error", {"type": "error", **exc.body()})
                return
            datas = await run_in_threadpool(_files, engine, result, out, prompt)
            state.metrics.images.inc(len(datas), model=engine.name)
            p = result.parameters
            for k, data in enumerate(datas):
                yield _sse("image_generation.completed",
                           {"b64_json": images.b64(data), "created_at": int(time.time()),
                            "output_format": out["output_format"], "size": f"{p['width']}x{p['height']}",
                            "background": "opaque", "quality": "auto", "seed": result.seeds[k]})
        finally:
            if not task.done():  # the client left mid-stream: run_ticket cancels the work
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event_type: str, data: dict) -> str:
    return f"event: {event_type}\ndata: {json.dumps({'type': event_type, **data})}\n\n"
