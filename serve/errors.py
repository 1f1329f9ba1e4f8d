"""Every failure the server returns, in OpenAI's error shape:
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that says who should act (4xx: the
caller; 5xx: the server). The A1111 routes use the same shape, so one client-side handler reads every error.

``kind`` is the label of ``edgediff_errors_total``; it is never sent to the client.
"""
from __future__ import annotations

import re
from typing import Mapping

from edgediff.errors import (BackendError, BundleError, Cancelled, ConfigError, EdgediffError, InputError,
                             NonFiniteError)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.kind = kind
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(model: str, retry_after: int) -> ApiError:
    return ApiError(429, f"the queue of model {model!r} is full; retry after {retry_after} s",
                    type="rate_limit_error", code="queue_full", kind="queue_full",
                    headers={"Retry-After": str(retry_after)})


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"the request did not finish within the server's {seconds:g} s timeout; use fewer steps, "
                         "a smaller size or fewer images, or retry when the server is less busy",
                    type="timeout_error", code="timeout", kind="timeout")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down and did not finish this request; retry on another replica",
                    type="server_error", code="shutting_down", kind="shutdown", headers={"Retry-After": "1"})


def not_ready(why: str) -> ApiError:
    return ApiError(503, f"the server is not ready: {why}", type="server_error", code="not_ready", kind="not_ready",
                    headers={"Retry-After": "1"})


def internal(exc: BaseException) -> ApiError:
    """A bug of ours: the class name only (the traceback is in the server log, never in a response)."""
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                    type="server_error", code="internal_error", kind="internal")


# The runtime's InputError messages start with the argument they are about (edgediff/validation.py); a route maps
# those names onto its own field names so the error names the field the client sent.
_LEADING_NAME = re.compile(r"^([a-z_][a-z0-9_]*)")


def from_edgediff(exc: EdgediffError, fields: Mapping[str, str]) -> ApiError:
    """The API error for an exception the runtime raised on purpose. ``fields`` maps the runtime's argument names
    (num_inference_steps, guidance_scale, height, ...) to the route's field names (steps, cfg_scale, size, ...)."""
    if isinstance(exc, (InputError, ConfigError)):
        m = _LEADING_NAME.match(str(exc))
        name = m.group(1) if m else ""
        if name == "unknown" and "scheduler" in str(exc):
            name = "scheduler"
        if name == "seeds":
            name = "seed"
        return bad_request(str(exc), fields.get(name, name if name in fields.values() else None))
    if isinstance(exc, Cancelled):
        return ApiError(499, str(exc), code="cancelled", kind="cancelled")
    if isinstance(exc, NonFiniteError):
        return ApiError(500, str(exc), type="server_error", code="non_finite", kind="non_finite")
    if isinstance(exc, (BackendError, BundleError)):
        return ApiError(500, str(exc), type="server_error", code="model_error", kind="model_error")
    return ApiError(500, str(exc), type="server_error", code="edgediff_error", kind="edgediff_error")
