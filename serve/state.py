"""What one server holds (its engines, limits, metrics, URL store) and the two steps every generation route shares:
turn the route's fields into a validated ``GenerationRequest``, then wait for its ticket while watching the client."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from edgediff.errors import Cancelled, EdgediffError

from . import errors
from .engine import Engine, Progress, QueueFull, ShuttingDown
from .files import FileStore
from .metrics import ServerMetrics

log = logging.getLogger("edgediff.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The runtime checks the model's own rules (size multiple, step range); these
    are the server's policy on top, so one client cannot hold the model for an hour or fill its memory."""

    max_body_bytes: int = 20 * 2**20  # a request body (JSON or multipart), checked while it arrives
    max_images: int = 8  # images per request (OpenAI n, A1111 batch_size * n_iter)
    max_steps: int = 150
    max_side: int = 2048  # pixels, width and height each
    max_prompt_chars: int = 4000  # CLIP reads ~77 tokens (~300 characters)
    request_timeout: float = 300.0  # seconds from admission; then 504 and the request's work is stopped


@dataclass
class ServerState:
    engines: dict[str, Engine]
    limits: Limits = Limits()
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    files: FileStore = field(default_factory=FileStore)
    default_name: str | None = None  # the model a request without "model" gets; None: the first engine

    @property
    def default_model(self) -> str:
        return self.default_name or next(iter(self.engines))

    def engine(self, name: str | None, param: str = "model") -> Engine:
        if name is None:
            name = self.default_model
        if name not in self.engines:
            raise errors.ApiError(400, f"model {name!r} is not loaded; this server has {sorted(self.engines)} "
                                       "(GET /v1/models)", param=param, code="model_not_found")
        return self.engines[name]

    def ready(self) -> tuple[bool, str]:
        for name, e in self.engines.items():
            if e.failure is not None:
                return False, f"model {name} failed: {type(e.failure).__name__}: {e.failure}"
            if not e.ready.is_set():
                return False, f"model {name} is warming up"
            if not e.accepting:
                return False, "shutting down"
        return True, "ready"


def check_multiple(engine: Engine, size: tuple[int | None, int | None], params: tuple[str, str]) -> None:
    """Refuse a height/width off the model's latent grid before an upload is resized to it (the runtime would
    round the resized image down without a word)."""
    m = engine.pipe.size_multiple
    for value, what, param in zip(size, ("height", "width"), params):
        if value is not None and value % m:
            lo = max(m, value - value % m)
            raise errors.bad_request(f"{what}={value} is not a multiple of {m} (model {engine.name!r}'s latent "
                                     f"grid); try {lo} or {lo + m}", param)


def build_request(engine: Engine, fields: Mapping[str, str], **kwargs: Any):
    """``Pipeline.request`` with the route's field names in its errors (``fields``: runtime name -> route name)."""
    try:
        return engine.pipe.request(**kwargs)
    except EdgediffError as exc:
        raise errors.from_edgediff(exc, fields) from None


async def run_ticket(state: ServerState, engine: Engine, request, http_request, fields: Mapping[str, str],
                     progress: Progress | None = None):
    """Admit ``request`` and wait for its result. The client leaving cancels the work before its next step; so does
    the server's timeout. Raises ApiError for every failure."""
    try:
        ticket = engine.submit(request, timeout=state.limits.request_timeout, progress=progress)
    except QueueFull as exc:
        raise errors.queue_full(engine.name, exc.retry_after) from None
    except ShuttingDown:
        raise errors.shutting_down() from None
    fut = asyncio.wrap_future(ticket.future)
    try:
        while not fut.done():
            await asyncio.wait({fut}, timeout=0.2)
            if not fut.done() and http_request is not None and await http_request.is_disconnected():
                ticket.cancel("disconnect")  # the engine drops it before its next step; wait for that to happen
    except asyncio.CancelledError:  # the server cancelled this handler (a stream closed, a forced shutdown)
        ticket.cancel("disconnect")
        raise
    exc = fut.exception()
    if exc is None:
        return ticket, fut.result()
    raise ticket_error(ticket, exc, fields)


def ticket_error(ticket, exc: BaseException, fields: Mapping[str, str]) -> errors.ApiError:
    if isinstance(exc, Cancelled) and ticket.stop_reason == "timeout":
        return errors.timed_out(ticket.timeout or 0.0)
    if isinstance(exc, Cancelled) and ticket.stop_reason == "shutdown":
        return errors.shutting_down()
    if isinstance(exc, Cancelled) and ticket.stop_reason == "disconnect":
        return errors.ApiError(499, "the client closed the connection; the request was cancelled",
                               code="client_closed_request", kind="disconnect")
    if isinstance(exc, EdgediffError):
        return errors.from_edgediff(exc, fields)
    log.error("request failed", exc_info=exc)
    return errors.internal(exc)

