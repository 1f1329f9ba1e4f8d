"""Config is data: JSON config files (diffusers' scheduler_config.json, model_index.json...) become frozen
dataclasses. Unknown keys warn (diffusers adds keys over time), bad values raise ``ConfigError`` naming the
allowed ones."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

# Keys diffusers writes into every config for its own bookkeeping; they carry no meaning for us.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str, ignore: Iterable[str] = ()) -> T:
    """Build dataclass ``cls`` from ``data``: known fields are taken, unknown keys warn once, listing them."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names - _BOOKKEEPING - set(ignore))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=3)
    kwargs = {k: v for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong types surface here from __post_init__ conversions
        raise ConfigError(f"{source}: {exc}") from None


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """Read a JSON object from ``path``; a missing, non-UTF-8, malformed or too deeply nested file, or one that
    holds something other than an object, is one clear ConfigError line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:  # json's guard against e.g. 100 000 nested lists
        raise ConfigError(f"{what} {path} is nested too deeply to be a config") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"{what} {path} holds a value that cannot be read: {str(exc)[:100]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def check_choice(source: str, key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ConfigError when ``value`` is not one of ``allowed``, naming them."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{source}: {key}={value!r}; expected one of {list(allowed)}")
