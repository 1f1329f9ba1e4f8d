"""edgediff.serve: ``edgediff serve``, an OpenAI-compatible image API with step-level continuous batching
(``pip install 'edgediff[serve]'``).

Why FastAPI on uvicorn: FastAPI is a thin layer over Starlette (routing, multipart uploads, exception handlers,
lifespan) that Ray Serve takes as its HTTP ingress unchanged (``@serve.ingress(app)``), so the same app runs as one
process here and as Ray Serve replicas (serve/ray_app.py); uvicorn is the reference ASGI server, pure Python on h11,
with a graceful shutdown this package hooks to drain its engines. Request bodies are read by serve/fields.py rather
than pydantic models, so a bad value gets the same one-line message naming the field on the JSON routes, the
multipart form and the A1111 shim.

Layout (heavy imports live only in this package; ``import edgediff`` and ``import edgediff.serve`` stay light):
    engine.py          one scheduler thread per model: bounded queue, continuous batching, cancel, drain
    state.py           the server's engines, limits, metrics; request building and waiting shared by the routes
    app.py             the FastAPI app, auth / body-limit / metrics middlewares, OpenAI-shaped errors
    routes_openai.py   POST /v1/images/generations, /v1/images/edits (SSE progress with stream=true)
    routes_a1111.py    POST /sdapi/v1/txt2img, /sdapi/v1/img2img, GET /sdapi/v1/sd-models, /sdapi/v1/samplers
    routes_ops.py      /healthz, /readyz, /metrics, /v1/models, /v1/files/{id}
    fields.py, images.py, files.py, errors.py, metrics.py   request fields, image bytes, URL store, errors, metrics
    server.py, cli.py  loading + uvicorn with a draining shutdown; the ``edgediff serve`` command
"""
