"""``edgediff serve``: parsing and printing only; attached lazily by edgediff.cli, so ``edgediff --help`` imports
none of the server stack. FastAPI and uvicorn are imported when the command runs, and their absence is one line
naming the extra to install."""
from __future__ import annotations

from pathlib import Path

import click

from edgediff.cli_types import POSITIVE_INT


def _model_spec(value: str) -> tuple[str, Path]:
    """``-m PATH`` (served under the folder's name) or ``-m NAME=PATH``."""
    name, sep, path = value.partition("=")
    if not sep:
        path = value
        name = Path(value).resolve().name
    return name, Path(path)


def _loras_by_model(options, names: list[str]) -> dict[str, dict[str, float]]:
    """``--lora [MODEL=]FILE[:WEIGHT]`` values -> model name -> {file: weight}, each file checked as generate's."""
    from edgediff.errors import InputError
    from edgediff.lora import parse_lora_option

    out: dict[str, dict[str, float]] = {}
    for text in options:
        model, sep, rest = text.partition("=")
        if not (sep and model in names):  # no MODEL= prefix (a file name may hold '=' too)
            model, rest = (names[0] if len(names) == 1 else ""), text
        if model not in names:
            hint = f"one of {', '.join(names)}" if len(names) > 1 else names[0]
            raise InputError(f"--lora {text!r}: name the model it is for as MODEL=FILE[:WEIGHT], MODEL {hint}")
        spec = parse_lora_option(rest)
        if not spec.path.is_file():
            raise InputError(f"--lora {text!r}: no file {spec.path}")
        out.setdefault(model, {})[str(spec.path)] = spec.weight
    return out


@click.command()
@click.option("-m", "--model", "models", multiple=True,
              help="Bundle folder to serve, as PATH or NAME=PATH; repeat for several (default: the built-in model). "
                   "Requests pick one with their 'model' field; the first is the default.")
@click.option("--lora", "loras", multiple=True, metavar="[MODEL=]FILE[:WEIGHT]",
              help="Serve MODEL with this LoRA applied at load (no re-export; repeat for several). Without MODEL= it "
                   "applies to the only model. Serve one bundle twice (-m a=B -m b=B) to offer it with and without.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 127.0.0.1 serves this machine only; 0.0.0.0 every network (set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="EDGEDIFF_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on the API routes (env: EDGEDIFF_API_KEY).")
@click.option("--backend", default="cpu", show_default=True, help="cpu, cuda or tensorrt (ONNX Runtime providers).")
@click.option("--no-batching", is_flag=True,
              help="Denoise one request at a time (the baseline continuous batching is measured against).")
@click.option("--max-active", type=POSITIVE_INT, default=8, show_default=True,
              help="Requests denoised together, per model.")
@click.option("--max-queue", type=click.IntRange(0), default=32, show_default=True,
              help="Requests waiting beyond those, per model; one more gets 429 with Retry-After.")
@click.option("--max-batch", type=POSITIVE_INT, default=None,
              help="At most this many denoiser rows per call (default: no cap).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take from admission; then 504 and its work stops.")
@click.option("--max-images", type=POSITIVE_INT, default=8, show_default=True, help="Images per request.")
@click.option("--max-steps", type=POSITIVE_INT, default=150, show_default=True, help="Denoising steps per request.")
@click.option("--max-side", type=POSITIVE_INT, default=2048, show_default=True, help="Pixels per side.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Largest request body (an uploaded image, base64 included).")
@click.option("--drain", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/Ctrl-C: seconds to finish admitted requests before failing them with 503.")
def serve(models, loras, host, port, api_key, backend, no_batching, max_active, max_queue, max_batch, timeout, max_images,
          max_steps, max_side, max_body_mb, drain) -> None:
    """Serve models over HTTP: OpenAI Images API (/v1/images/generations, /v1/images/edits, /v1/models), an
    A1111-compatible shim (/sdapi/v1/txt2img, /sdapi/v1/img2img), /healthz, /readyz and Prometheus /metrics.
    Requests to one model are denoised together, step by step (continuous batching)."""
    from edgediff.errors import InputError, missing

    try:
        from .engine import EngineConfig
        from .server import serve as run
        from .state import Limits
        import fastapi  # noqa: F401 - the [serve] extra: checked before any model loads
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise missing(exc.name or "fastapi", "serve", "edgediff serve") from None

    specs = [_model_spec(m) for m in models]
    if not specs:
        from edgediff.builtin_model import DEFAULT_MODEL, default_bundle

        specs = [(DEFAULT_MODEL, default_bundle())]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"two models are named {dup!r}; name them with -m NAME=PATH")
    per_model = _loras_by_model(loras, names)
    specs = [(n, p, per_model.get(n, {})) for n, p in specs]
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key / EDGEDIFF_API_KEY is empty; give a key or leave it unset")
    config = EngineConfig(max_active=max_active, max_queue=max_queue, max_batch=max_batch, batching=not no_batching)
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_images=max_images, max_steps=max_steps,
                    max_side=max_side, request_timeout=timeout)

    def ready(bound_port: int) -> None:
        mode = "batching off" if no_batching else f"continuous batching, up to {max_active} together"
        auth = "API key required" if api_key else "no API key"
        click.echo(f"edgediff serve: ready on http://{host}:{bound_port} (models: {', '.join(names)}; {mode}; {auth})",
                   err=True)

    def loading() -> None:
        click.echo(f"loading {', '.join(f'{n} ({p})' for n, p, _ in specs)} ...", err=True)

    run(specs, host=host, port=port, backend=backend, config=config, limits=limits, api_key=api_key, drain=drain,
        on_loading=loading, on_ready=ready)
    click.echo("edgediff serve: stopped", err=True)

