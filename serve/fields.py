"""Reading request fields: one reader for JSON bodies (types as sent: ``"n": "2"`` is refused) and multipart
forms (every value is text: ``n=2`` is read as an integer), so the OpenAI routes, the edits form and the A1111 shim
refuse a bad value with the same message naming the same field. A field sent as ``null`` counts as not sent."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from .errors import bad_request

_MISSING = object()


class Fields:
    def __init__(self, values: Mapping[str, Any], *, form: bool = False, allowed: Iterable[str] | None = None,
                 ignored: Iterable[str] = ()):
        """``allowed``: every field the route reads; another one is refused by name (a misspelt knob must not be
        silently dropped). ``ignored``: fields accepted and not used (other clients' defaults)."""
        self.values, self.form = values, form
        if allowed is not None:
            known = set(allowed) | set(ignored)
            unknown = sorted(k for k in values if k not in known)
            if unknown:
                raise bad_request(f"unknown field {unknown[0]!r}; this route takes {', '.join(sorted(allowed))}",
                                  unknown[0], code="unknown_parameter")

    def _get(self, name: str):
        v = self.values.get(name, _MISSING)
        return _MISSING if v is None else v

    def has(self, name: str) -> bool:
        return self._get(name) is not _MISSING

    def string(self, name: str, default: Any = None, *, required: bool = False, max_chars: int | None = None,
               choices: Iterable[str] | None = None) -> Any:
        v = self._get(name)
        if v is _MISSING:
            if required:
                raise bad_request(f"{name} is required", name, code="missing_required_parameter")
            return default
        if not isinstance(v, str):
            raise bad_request(f"{name} must be a string, not {_kind(v)}", name, code="invalid_type")
        if max_chars is not None and len(v) > max_chars:
            raise bad_request(f"{name} has {len(v)} characters; the limit is {max_chars}", name)
        if choices is not None:
            allowed = list(choices)
            if v not in allowed:
                raise bad_request(f"{name}={v!r}; expected one of {allowed}", name)
        return v

    def integer(self, name: str, default: Any = None, *, lo: int | None = None, hi: int | None = None) -> Any:
        v = self._get(name)
        if v is _MISSING:
            return default
        if self.form and isinstance(v, str):
            try:
                v = int(v.strip())
            except ValueError:
                raise bad_request(f"{name} must be an integer, not {v[:40]!r}", name, code="invalid_type") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(f"{name} must be an integer, not {_kind(v)}", name, code="invalid_type")
        _check_range(name, v, lo, hi)
        return v

    def number(self, name: str, default: Any = None, *, lo: float | None = None, hi: float | None = None) -> Any:
        v = self._get(name)
        if v is _MISSING:
            return default
        if self.form and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise bad_request(f"{name} must be a number, not {v[:40]!r}", name, code="invalid_type") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_request(f"{name} must be a number, not {_kind(v)}", name, code="invalid_type")
        if not math.isfinite(v):
            raise bad_request(f"{name} must be a finite number", name)
        _check_range(name, v, lo, hi)
        return float(v)

    def boolean(self, name: str, default: Any = None) -> Any:
        v = self._get(name)
        if v is _MISSING:
            return default
        if self.form and isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        if not isinstance(v, bool):
            raise bad_request(f"{name} must be true or false, not {_kind(v)}", name, code="invalid_type")
        return v

    def strings(self, name: str, default: Any = None) -> Any:
        v = self._get(name)
        if v is _MISSING:
            return default
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise bad_request(f"{name} must be a list of strings, not {_kind(v)}", name, code="invalid_type")
        return v


def parse_size(value: str, param: str = "size") -> tuple[int, int] | None:
    """OpenAI's ``"WIDTHxHEIGHT"`` -> (height, width); ``"auto"`` -> None (the model's default size)."""
    if value == "auto":
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not all(int(p) > 0 for p in parts):
        raise bad_request(f"{param}={value!r}; expected WIDTHxHEIGHT with positive integers (e.g. 512x512) or "
                          "'auto'", param)
    return int(parts[1]), int(parts[0])


def _check_range(name: str, v, lo, hi) -> None:
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if lo is not None and hi is not None:
            raise bad_request(f"{name}={v}; must be between {lo} and {hi}", name)
        raise bad_request(f"{name}={v}; must be {'>= ' + str(lo) if lo is not None else '<= ' + str(hi)}", name)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(v), type(v).__name__)
