"""edgediff on Ray Serve (``pip install 'edgediff[serve-ray]'``): the same app, as replicas, routed by model.

    serve run edgediff.serve.ray_app:app_builder models=shapes num_replicas=2

starts it on the Ray cluster that ``RAY_ADDRESS`` (or ``--address``) names, or on a new local one when none is set
(``ray start --head`` first for a long-lived local cluster); the same command against a multi-node cluster's
address spreads the replicas over its nodes. Ray's HTTP proxy listens on port 8000; ``serve start --http-host H
--http-port P`` before ``serve run`` changes that.

Arguments (``key=value``): ``models`` (comma list of NAME or NAME=BUNDLE; the built-in model is ``shapes``; the
first is the default), ``num_replicas`` (or ``min_replicas``/``max_replicas`` for autoscaling on ongoing
requests), ``max_active``, ``max_queue``, ``api_key``, ``backend``.

Two deployments:
    EdgediffRouter   the ingress. Reads the request's model (JSON ``model``, the edits form's ``model``, A1111's
                     ``override_settings.sd_model_checkpoint``; else the default) and passes the whole request to
                     a replica with ``multiplexed_model_id`` set to it, streaming the answer back (SSE included).
                     A replica that dies mid-request is retried once on another; if that fails too the client gets
                     a 503 error, never silence.
    EdgediffReplica  one model set per replica, loaded on demand by ``@serve.multiplexed``: each loaded model is an Engine (serve/engine.py: continuous
                     batching) behind the same FastAPI app ``edgediff serve`` runs, called in-process over ASGI.
                     A replica keeps ``MODELS_PER_REPLICA`` models; loading another evicts the least recently used.

Ray routes requests for a model to replicas that already hold it, so a model is loaded on few replicas and its
requests are batched together there.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from . import errors
from .app import create_app
from .engine import Engine, EngineConfig
from .state import Limits, ServerState

log = logging.getLogger("edgediff.serve")


def model_table(spec: str | None) -> dict[str, str]:
    """``"shapes,sd15=/models/sd15"`` -> {name: bundle path}; a bare name is the built-in model or a folder."""
    from edgediff.builtin_model import DEFAULT_MODEL, default_bundle

    table: dict[str, str] = {}
    for item in [s.strip() for s in (spec or DEFAULT_MODEL).split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        if not sep:
            path = str(default_bundle()) if name == DEFAULT_MODEL else name
            name = Path(name).name
        table[name] = path
    return table


class _LoadedModel:
    """What the multiplexer caches per model: the engine, shut down when the model is evicted."""

    def __init__(self, engine: Engine, state: ServerState):
        self.engine, self.state = engine, state

    def __del__(self):  # Ray's multiplexer calls this on LRU eviction
        self.state.engines.pop(self.engine.name, None)
        self.engine.shutdown(grace=30.0)


MODELS_PER_REPLICA = 2  # models one replica keeps loaded (Ray's multiplexing LRU); Ray needs it at class level


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EdgediffReplica:
    def __init__(self, models: dict[str, str], engine_config: dict, limits: dict, api_key: str | None,
                 backend: str = "cpu"):
        self.models, self.backend = models, backend
        self.config = EngineConfig(**engine_config)
        self.state = ServerState({}, limits=Limits(**limits), api_key=api_key, default_name=next(iter(models)))
        self.app = create_app(self.state)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def _load(self, model_id: str) -> _LoadedModel:
        from edgediff import Pipeline

        pipe = await asyncio.to_thread(Pipeline.load, self.models[model_id], self.backend)
        engine = Engine(model_id, pipe, self.config, self.state.metrics).start()
        await asyncio.to_thread(engine.ready.wait)
        if engine.failure is not None:
            raise engine.failure
        self.state.engines[model_id] = engine
        return _LoadedModel(engine, self.state)

    async def load(self) -> None:
        model_id = serve.get_multiplexed_model_id() or self.state.default_name
        if model_id in self.models:  # an unknown name reaches the app, which answers 400 naming the field
            await self._load(model_id)

    async def call(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator:
        """One HTTP request through this replica's app: yields the response start, then body chunks."""
        await self.load()
        async for message in asgi_call(self.app, method, path, query, headers, body):
            yield message

    def check_health(self) -> None:
        for name, engine in self.state.engines.items():
            if engine.failure is not None:
                raise RuntimeError(f"model {name} failed: {engine.failure}")


def build_router(replica, models: dict[str, str], max_body_bytes: int) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    default = next(iter(models))
    cards = [_card(name, path) for name, path in models.items()]

    @app.get("/v1/models")
    async def list_models():  # every model of the deployment, loaded on some replica or not
        return {"object": "list", "data": cards}

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def route(request: Request, path: str):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            err = errors.ApiError(413, f"the request body is over this server's limit of "
                                       f"{max_body_bytes / 2**20:.1f} MiB", code="request_too_large")
            return JSONResponse(err.body(), status_code=413)
        body = await request.body()
        model = await _model_of(request, body) or default
        if model not in models:
            param = "override_settings.sd_model_checkpoint" if path.startswith("sdapi/") else "model"
            err = errors.ApiError(400, f"model {model!r} is not served here; this deployment has {sorted(models)} "
                                       "(GET /v1/models)", param=param, code="model_not_found")
            return JSONResponse(err.body(), status_code=400)
        args = (request.method, request.url.path, request.url.query.encode(), list(request.scope["headers"]), body)
        for attempt in (1, 2):
            stream = replica.options(stream=True, multiplexed_model_id=model).call.remote(*args)
            try:
                start = await stream.__anext__()
            except Exception as exc:  # the replica died or failed before answering: once more on another
                log.warning("replica failed before answering (attempt %d): %s", attempt, exc)
                if attempt == 2:
                    err = errors.ApiError(503, "no replica could answer (one died mid-request); retry",
                                          type="server_error", code="replica_unavailable",
                                          headers={"Retry-After": "1"})
                    return JSONResponse(err.body(), status_code=503, headers=err.headers)
                continue
            break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")}
        return StreamingResponse(_chunks(stream), status_code=start["status"], headers=headers)

    return app


def _card(name: str, path: str) -> dict:
    from edgediff.bundle import layout
    from edgediff.bundle.reader import Bundle
    from edgediff.schedulers import name_for_class

    from .routes_ops import model_card

    bundle = Bundle.open(path)
    scheduler = name_for_class(bundle.config(layout.SCHEDULER_CONFIG).get("_class_name", "PNDMScheduler"))
    return model_card(name, bundle, scheduler)


async def _chunks(stream) -> AsyncIterator[bytes]:
    async for message in stream:
        if message.get("body"):
            yield message["body"]


async def _model_of(request: Request, body: bytes) -> str | None:
    """The model a request names, wherever its route keeps it; None when it names none (or is malformed: the
    replica's app then gives the precise 400)."""
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            value = (await request.form()).get("model")
            return value if isinstance(value, str) else None
        if body:
            data = json.loads(body)
            if isinstance(data, dict):
                model = data.get("model") or (data.get("override_settings") or {}).get("sd_model_checkpoint")
                return model if isinstance(model, str) else None
    except Exception:  # noqa: BLE001 - routing is best effort; the replica validates
        return None
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class EdgediffRouter:
    def __init__(self, replica, models: dict[str, str], max_body_bytes: int):
        self.replica, self.models, self.max_body_bytes = replica, models, max_body_bytes

    def __serve_build_asgi_app__(self):
        return build_router(self.replica, self.models, self.max_body_bytes)


async def asgi_call(app, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator[dict]:
    """Run one request through an ASGI app in this process, yielding its response messages: start first
    ({"status", "headers"}), then {"body"} chunks."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    out: asyncio.Queue = asyncio.Queue()
    delivered = False
    never = asyncio.Event()

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the caller's disconnect arrives as cancellation of this generator instead
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                task.result()  # the app ended without a complete response: its error, if any
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": message.get("headers", [])}
            elif message["type"] == "http.response.body":
                yield {"body": message.get("body", b"")}
                if not message.get("more_body", False):
                    return
    finally:
        if not task.done():
            task.cancel()


def app_builder(args: dict[str, Any]):
    """``serve run edgediff.serve.ray_app:app_builder key=value ...`` (see the module doc)."""
    models = model_table(args.get("models"))
    limits = Limits()
    engine_config = dict(max_active=int(args.get("max_active", 8)), max_queue=int(args.get("max_queue", 32)))
    replica_options: dict[str, Any] = {}
    if "min_replicas" in args or "max_replicas" in args:
        replica_options["autoscaling_config"] = {"min_replicas": int(args.get("min_replicas", 1)),
                                                 "max_replicas": int(args.get("max_replicas", 4)),
                                                 "target_ongoing_requests": int(args.get("max_active", 8))}
    else:
        replica_options["num_replicas"] = int(args.get("num_replicas", 1))
    replica = EdgediffReplica.options(**replica_options).bind(
        models, engine_config, limits.__dict__, args.get("api_key"), args.get("backend", "cpu"))
    return EdgediffRouter.bind(replica, models, limits.max_body_bytes)
