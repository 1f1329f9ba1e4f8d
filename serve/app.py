"""The ASGI app: routes (OpenAI Images, A1111 shim, operations), and three thin ASGI middlewares applied to every
request, outermost first:

    metrics     counts responses by route template and status (``edgediff_requests_total``)
    body limit  refuses a body over ``Limits.max_body_bytes`` with 413, from Content-Length or while it streams in
    auth        with an API key set: ``Authorization: Bearer KEY`` on /v1/* and /sdapi/* (not /healthz, /readyz,
                /metrics, which carry no user data, nor /v1/files/{id}, whose unguessable id is the capability)

CORS is off: no CORSMiddleware, so browsers on other origins cannot call the API unless a proxy in front adds it.
Every failure, including unknown routes, wrong methods and bugs, is OpenAI's error JSON; a traceback goes to the
server log only.
"""
from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import errors
from .errors import ApiError
from .state import ServerState

log = logging.getLogger("edgediff.serve")

OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v1/files/")
PROTECTED_PREFIXES = ("/v1/", "/sdapi/")


def create_app(state: ServerState, *, shutdown_grace: float = 30.0) -> FastAPI:
    """An app over running engines. On the app's shutdown the engines stop admitting, finish what they hold within
    ``shutdown_grace`` seconds and cancel the rest."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for engine in state.engines.values():
            engine.shutdown(shutdown_grace)
        for engine in state.engines.values():
            engine.join(shutdown_grace + 5.0)

    app = FastAPI(title="edgediff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edgediff = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        state.metrics.errors.inc(kind=exc.kind)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}; see GET /v1/models and the README",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return await api_error(request, ApiError(exc.status_code, message, code=code, kind=kind,
                                                 headers=getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await api_error(request, errors.bad_request(f"{param}: {first.get('msg', 'invalid value')}", param))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return await api_error(request, errors.internal(exc))

    from .routes_a1111 import router as a1111
    from .routes_ops import router as ops
    from .routes_openai import router as openai

    app.include_router(openai)
    app.include_router(a1111)
    app.include_router(ops)
    return _Metrics(_BodyLimit(_Auth(app, state), state), state, app)


class _Wrapper:
    """Forward attribute access (``app.state``, ``router``) to the FastAPI app inside, so callers can treat the
    wrapped app as the FastAPI one."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Auth(_Wrapper):
    def __init__(self, inner, state: ServerState):
        super().__init__(inner)
        self.state, self.key = state, state.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key and _protected(scope["path"]):
            sent = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = sent.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' (the server's "
                                    "--api-key / EDGEDIFF_API_KEY)", code="invalid_api_key", kind="auth",
                               headers={"WWW-Authenticate": "Bearer"})
                self.state.metrics.errors.inc(kind=err.kind)
                await _send_error(send, err)
                return
        await self.inner(scope, receive, send)


class _BodyLimit(_Wrapper):
    def __init__(self, inner, state: ServerState):
        super().__init__(inner)
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit = self.state.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            err = _too_large(limit)
            self.state.metrics.errors.inc(kind=err.kind)
            return await _send_error(send, err)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body without Content-Length: refused as it streams in
                    raise _too_large(limit)
            return message

        await self.inner(scope, limited, send)


class _Metrics(_Wrapper):
    def __init__(self, inner, state: ServerState, app: FastAPI):
        super().__init__(inner)
        self.state, self.app = state, app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        status = {"code": 500}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, watch)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.state.metrics.requests.inc(route=route, status=str(status["code"]))


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) and not path.startswith(OPEN_PATHS)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit / 2**20:.1f} MiB; send a smaller "
                         "image", code="request_too_large", kind="too_large")


async def _send_error(send, err: ApiError) -> None:
    """A JSON error sent from a middleware, before (or instead of) the app."""
    response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
