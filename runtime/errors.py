"""One exception hierarchy for every layer of edgediff.

Each message is one line that names what is wrong and how to fix it; the CLI prints it in red and exits non-zero,
API callers catch the typed class. Never raise bare ``Exception``/``AssertionError`` on a path a user can reach.
"""
from __future__ import annotations


class EdgediffError(Exception):
    """Base class: everything edgediff raises on purpose."""

    exit_code = 1


class ConfigError(EdgediffError, ValueError):
    """A configuration value (scheduler_config.json, model_index.json, options) is invalid."""


class InputError(EdgediffError, ValueError):
    """A call argument is invalid (prompt, size, steps, guidance, strength, init image...)."""

    exit_code = 2


class BundleError(EdgediffError):
    """A model bundle is missing, malformed or unsafe."""


class BundleNotFound(BundleError, FileNotFoundError):
    """The path does not exist or is not a bundle."""


class BundleIntegrityError(BundleError):
    """A file of the bundle is missing, truncated or altered (checksum mismatch)."""


class UnsafePathError(BundleError):
    """A path inside the bundle points outside of it (absolute, '..', or a symlink escape)."""


class ExportError(EdgediffError):
    """Turning a diffusers pipeline into a bundle failed (bad source, unsupported class, refused weights)."""


class ParityError(ExportError):
    """An exported component disagrees with PyTorch past the documented tolerance."""


class OutputExistsError(EdgediffError, FileExistsError):
    """Refusing to overwrite something the user already has; pass --overwrite to replace it."""


class OutputWriteError(EdgediffError, OSError):
    """An output cannot be written (read-only or full disk, a pseudo file system, a name too long); nothing was
    left half-written."""


class BackendUnavailable(EdgediffError):
    """The requested backend/provider is not installed or not usable on this machine."""


class BackendError(EdgediffError):
    """A backend failed while running a component (bad feeds, runtime failure)."""


class NonFiniteError(EdgediffError, FloatingPointError):
    """NaN/Inf appeared in latents or pixels: refuse to return a black or garbage image."""


class Cancelled(EdgediffError):
    """Generation was cancelled between steps by the caller."""


class EngineError(EdgediffError):
    """A TensorRT engine could not be built, loaded or run."""


class EngineIncompatible(EngineError):
    """A cached engine was built for another GPU, TensorRT version or ONNX file."""


class MissingDependency(EdgediffError, ImportError):
    """An optional dependency (extra) is needed for this command."""


def missing(package: str, extra: str, purpose: str) -> MissingDependency:
    """Build the one-line error for an optional dependency that is not installed."""
    return MissingDependency(
        f"{purpose} needs {package!r}, which is not installed: pip install 'edgediff[{extra}]'"
    )
