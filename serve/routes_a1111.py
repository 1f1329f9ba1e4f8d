"""An AUTOMATIC1111-compatible shim, so existing clients and UIs work unchanged: ``POST /sdapi/v1/txt2img``,
``POST /sdapi/v1/img2img`` -> ``{"images": [base64 PNG], "parameters": {...}, "info": "<JSON text>"}``, plus the
two listings clients read first, ``GET /sdapi/v1/sd-models`` and ``GET /sdapi/v1/samplers``.

Fields: prompt, negative_prompt, steps, cfg_scale, sampler_name (A1111's names, e.g. "Euler a", "DPM++ 2M", with
``scheduler: "Karras"``; edgediff's names work too), seed (-1: random), batch_size, n_iter, width, height,
denoising_strength, init_images (base64, data: URLs accepted); the model is picked with
``override_settings.sd_model_checkpoint``. A field left out takes the model's default (not A1111's 512x512 / 20
steps: the bundle knows its own size and steps). A1111 features this runtime does not have are refused by name
when turned on (hires fix, face restoration, tiling, scripts, masks); A1111's bookkeeping fields are accepted and
ignored. Errors use the same OpenAI JSON shape as every other route.
"""
from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from . import images
from .errors import bad_request
from .fields import Fields
from .routes_openai import _json_object
from .state import build_request, check_multiple, run_ticket

router = APIRouter()

FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
          "guidance_scale": "cfg_scale", "height": "height", "width": "width", "num_images_per_prompt": "batch_size",
          "seed": "seed", "scheduler": "sampler_name", "strength": "denoising_strength", "image": "init_images",
          "init": "init_images", "mask_image": "mask"}
# A1111 sampler names -> edgediff schedulers ("<name> Karras" is the name with scheduler="Karras")
SAMPLERS = {"Euler a": "euler_a", "Euler": "euler", "DDIM": "ddim", "PLMS": "pndm", "PNDM": "pndm",
            "DPM++ 2M": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m_karras", "LCM": "lcm", "UniPC": "unipc"}
TXT2IMG = ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler_name", "sampler_index", "scheduler", "seed",
           "batch_size", "n_iter", "width", "height", "override_settings", "enable_hr", "restore_faces", "tiling",
           "script_name", "alwayson_scripts")
IMG2IMG = TXT2IMG + ("init_images", "denoising_strength", "resize_mode", "mask", "include_init_images")
# accepted and ignored: A1111's bookkeeping and knobs that change nothing here at their defaults
IGNORED = ("styles", "subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "eta", "s_churn",
           "s_tmax", "s_tmin", "s_noise", "s_min_uncond", "do_not_save_samples", "do_not_save_grid",
           "override_settings_restore_afterwards", "send_images", "save_images", "script_args", "comments",
           "disable_extra_networks", "firstpass_image", "infotext", "force_task_id", "refiner_checkpoint",
           "refiner_switch_at", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
           "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
           "firstphase_width", "firstphase_height", "denoising_strength_txt2img", "image_cfg_scale",
           "initial_noise_multiplier", "latent_mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
           "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert", "mask_round")


@router.post("/sdapi/v1/txt2img")
async def txt2img(request: Request):
    return await _generate(request, img2img=False)


@router.post("/sdapi/v1/img2img")
async def img2img(request: Request):
    return await _generate(request, img2img=True)


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request):
    return [{"title": name, "model_name": name, "hash": e.pipe.bundle.digest[:10], "sha256": e.pipe.bundle.digest,
             "filename": str(e.pipe.bundle.root), "config": None}
            for name, e in request.app.state.edgediff.engines.items()]


@router.get("/sdapi/v1/samplers")
async def samplers():
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]


async def _generate(request: Request, *, img2img: bool) -> dict:
    state = request.app.state.edgediff
    body = await _json_object(request)
    f = Fields(body, allowed=IMG2IMG if img2img else TXT2IMG, ignored=IGNORED)
    for name in ("enable_hr", "restore_faces", "tiling"):
        if f.boolean(name, False):
            raise bad_request(f"{name}: this server does not do that (an A1111 feature edgediff lacks); set it to "
                              "false", name, code="unsupported_parameter")
    if f.string("script_name") or body.get("alwayson_scripts"):
        name = "script_name" if f.string("script_name") else "alwayson_scripts"
        raise bad_request(f"{name}: scripts and extensions are not supported; leave it empty", name,
                          code="unsupported_parameter")
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise bad_request("override_settings must be an object", "override_settings", code="invalid_type")
    model = overrides.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise bad_request("override_settings.sd_model_checkpoint must be a string", "override_settings",
                          code="invalid_type")
    engine = state.engine(model, param="override_settings.sd_model_checkpoint")
    lim = state.limits
    batch = f.integer("batch_size", 1, lo=1, hi=lim.max_images)
    n_iter = f.integer("n_iter", 1, lo=1, hi=lim.max_images)
    if batch * n_iter > lim.max_images:
        raise bad_request(f"batch_size * n_iter = {batch * n_iter}; this server makes at most {lim.max_images} "
                          "images a request", "n_iter")
    seed = f.integer("seed", -1, lo=-1, hi=2**63 - 1)
    width, height = (f.integer(k, lo=1, hi=lim.max_side) for k in ("width", "height"))
    check_multiple(engine, (height, width), ("height", "width"))
    knobs = dict(prompt=f.string("prompt", "", max_chars=lim.max_prompt_chars),
                 negative_prompt=f.string("negative_prompt", max_chars=lim.max_prompt_chars) or None,
                 num_inference_steps=f.integer("steps", lo=1, hi=lim.max_steps),
                 guidance_scale=f.number("cfg_scale", lo=0.0, hi=100.0),
                 num_images_per_prompt=batch * n_iter, seed=None if seed == -1 else seed,
                 scheduler=_sampler(f), height=height, width=width)
    if img2img:
        inits = body.get("init_images")
        if not isinstance(inits, list) or len(inits) != 1:
            raise bad_request("init_images must be a list with one base64 image", "init_images",
                              code="invalid_type" if not isinstance(inits, list) else "invalid_value")
        picture = images.open_image(images.decode_base64(inits[0], "init_images"), "init_images")
        size = None if width is None and height is None else (height or picture.size[1], width or picture.size[0])
        knobs.update(image=images.fit(picture, size), height=None, width=None,
                     strength=f.number("denoising_strength", lo=0.0, hi=1.0))
        if body.get("mask"):  # inpainting, A1111's convention: white is repainted (inverted on request)
            mask = images.open_image(images.decode_base64(body["mask"], "mask"), "mask").convert("L")
            if f.integer("inpainting_mask_invert", 0, lo=0, hi=1):
                from PIL import ImageOps

                mask = ImageOps.invert(mask)
            knobs["mask_image"] = images.fit(mask, size)
    req = build_request(engine, FIELDS, **knobs)
    t0 = time.perf_counter()
    _, result = await run_ticket(state, engine, req, request, FIELDS)
    backend = engine.pipe.components.backend
    datas = await run_in_threadpool(
        lambda: [images.encode(im, "png", result.image_parameters(k, prompt=knobs["prompt"], rng="numpy",
                                                                  backend=backend, model=engine.name))
                 for k, im in enumerate(result.images)])
    state.metrics.images.inc(len(datas), model=engine.name)
    state.metrics.stage_seconds.observe(time.perf_counter() - t0, model=engine.name, stage="total")
    p = result.parameters
    parameters = {k: v for k, v in body.items() if k != "init_images"}
    parameters.update(prompt=knobs["prompt"], negative_prompt=knobs["negative_prompt"] or "", steps=p["steps"],
                      cfg_scale=p["guidance_scale"], sampler_name=_sampler_name(p["scheduler"]),
                      seed=result.seeds[0], batch_size=batch, n_iter=n_iter, width=p["width"], height=p["height"])
    info = {"prompt": knobs["prompt"], "all_prompts": [knobs["prompt"]] * len(datas),
            "negative_prompt": knobs["negative_prompt"] or "", "seed": result.seeds[0],
            "all_seeds": list(result.seeds), "steps": p["steps"], "cfg_scale": p["guidance_scale"],
            "sampler_name": _sampler_name(p["scheduler"]), "width": p["width"], "height": p["height"],
            "batch_size": batch, "n_iter": n_iter, "sd_model_name": engine.name,
            "sd_model_hash": engine.pipe.bundle.digest[:10], "denoising_strength": p.get("strength"),
            "infotexts": [json.dumps(result.image_parameters(k), sort_keys=True) for k in range(len(datas))]}
    return {"images": [images.b64(d) for d in datas], "parameters": parameters, "info": json.dumps(info)}


def _sampler(f: Fields) -> str | None:
    name = f.string("sampler_name") or f.string("sampler_index")
    if name is None:
        return None
    karras = (f.string("scheduler") or "").lower() == "karras"
    key = f"{name} Karras" if karras and not name.endswith("Karras") else name
    if key in SAMPLERS:
        return SAMPLERS[key]
    if name in SAMPLERS.values():
        return name
    raise bad_request(f"sampler_name={name!r}; expected one of {sorted(SAMPLERS)} (or edgediff's "
                      f"{sorted(set(SAMPLERS.values()))})", "sampler_name")


def _sampler_name(ours: str) -> str:
    return next((a for a, o in SAMPLERS.items() if o == ours), ours)
