"""Writing results without losing anything the user had: atomic, no-clobber unless asked."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, OutputExistsError


def image_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InputError(f"output {output} must end in .png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(count)]


def check_writable(paths: Sequence[Path], overwrite: bool) -> None:
    for p in paths:
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} exists; choose another --output or pass --overwrite")
        if p.is_dir():
            raise OutputExistsError(f"{p} is a folder; choose a file name ending in .png")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise InputError(f"output folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise InputError(f"output folder {parent} is not writable")


def write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then move it into place. Without ``overwrite`` the
    final step is a hard link, which fails instead of replacing a file that appeared meanwhile."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path} exists; choose another --output or pass --overwrite") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def png_bytes(image, parameters: dict[str, Any]) -> bytes:
    """PNG with the generation parameters in a tEXt chunk ("parameters", JSON)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
