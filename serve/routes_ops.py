"""Operations routes: liveness, readiness, Prometheus metrics, the model list and the short-lived image files."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .errors import ApiError
from .metrics import ServerMetrics

router = APIRouter()


def _state(request: Request):
    return request.app.state.edgediff


@router.get("/healthz")
async def healthz(request: Request):
    """Alive: the process answers and every engine thread runs (a dead engine needs a restart, not traffic)."""
    dead = [name for name, e in _state(request).engines.items() if not e.alive and e.failure is not None]
    if dead:
        return JSONResponse({"status": "unhealthy", "failed": dead}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready for traffic: every model loaded and warmed up, and the server not shutting down."""
    ok, why = _state(request).ready()
    return JSONResponse({"status": "ready" if ok else "not_ready", "reason": why}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    return PlainTextResponse(_state(request).metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)


@router.get("/v1/models")
async def models(request: Request):
    engines = _state(request).engines
    return {"object": "list", "data": [model_card(name, e.pipe.bundle, e.pipe.default_scheduler)
                                       for name, e in engines.items()]}


def model_card(name: str, bundle, default_scheduler: str) -> dict:
    """One /v1/models entry: OpenAI's fields, then edgediff's facts for clients that pick sizes and steps per
    model (from the bundle alone, so a router that loads no model can answer too)."""
    m = bundle.manifest
    return {"id": name, "object": "model", "created": 0, "owned_by": "edgediff",
            "family": m.family, "default_size": f"{m.default_width}x{m.default_height}",
            "size_multiple": bundle.size_multiple, "default_steps": bundle.default_steps,
            "default_guidance_scale": bundle.default_guidance, "default_scheduler": default_scheduler,
            "img2img": bundle.has("vae_encoder"), "digest": bundle.digest}


@router.get("/v1/files/{file_id}")
async def file(file_id: str, request: Request):
    entry = _state(request).files.get(file_id)
    if entry is None:
        raise ApiError(404, f"no file {file_id!r}: image URLs expire {_state(request).files.ttl:g} s after the "
                            "response (or when the server restarts); ask for response_format='b64_json' to keep the "
                            "bytes", param=None, code="file_not_found", kind="not_found")
    media_type, data = entry
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=60"})
