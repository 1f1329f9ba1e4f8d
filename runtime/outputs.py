"""Writing results without losing anything the user had: checked before the work, atomic, all-or-nothing, no
clobbering unless asked, and with the permissions the user's umask asks for."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import validation as check
from .bundle.writer import current_umask
from .errors import EdgediffError, InputError, OutputExistsError, OutputWriteError


def image_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several. The count is checked first, so a
    huge one is refused at once rather than after building its paths."""
    check.count(count)
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InputError(f"output {output} must end in .png")
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(count)]


def check_writable(paths: Sequence[Path], overwrite: bool, *, expected_bytes: int = 0) -> None:
    """Everything that would make writing ``paths`` fail, found before any work: an existing file (without
    ``overwrite``), a folder in the way, a missing or read-only folder, a name the file system refuses, a pseudo
    file system, and (when ``expected_bytes`` is given) too little free space for all of them."""
    parents: dict[Path, int] = {}
    for p in paths:
        p = Path(p)
        parent = p.parent if str(p.parent) else Path(".")
        name_max = _name_max(parent)
        if len(os.fsencode(_temp_prefix(p))) + 16 > name_max:  # the temp name is longer than the final one
            raise InputError(f"output file name {p.name[:40]}... is too long ({len(p.name)} characters; this file "
                             f"system allows {name_max} bytes, less the temporary suffix): choose a shorter name")
        if p.is_dir():
            raise OutputExistsError(f"{p} is a folder; choose a file name ending in .png")
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} exists; choose another --output or pass --overwrite")
        if not parent.is_dir():
            raise InputError(f"output folder {parent} does not exist")
        parents[parent] = parents.get(parent, 0) + 1
    for parent, count in parents.items():
        _probe(parent)
        if expected_bytes:
            free = shutil.disk_usage(parent).free
            need = expected_bytes * count
            if free < need:
                raise OutputWriteError(f"{parent} has {free / 2**20:.1f} MiB free; the {count} image(s) need about "
                                       f"{need / 2**20:.1f} MiB: free some space or choose another --output")


def write_atomic(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then move it into place. Without ``overwrite`` the
    final step is a hard link, which fails instead of replacing a file that appeared meanwhile."""
    write_all([Path(path)], [data], overwrite=overwrite)


def write_all(paths: Sequence[Path], datas: Sequence[bytes], *, overwrite: bool) -> None:
    """Write every file or none: all are written to temp files beside their targets first (a full disk fails here,
    before any target exists), then moved into place; if a move fails, the targets already placed are removed."""
    temps: list[str] = []
    placed: list[Path] = []
    try:
        for path, data in zip(paths, datas):
            temps.append(_write_temp(Path(path), data))
        for path, tmp in zip(paths, temps):
            path = Path(path)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise OutputExistsError(f"{path} exists; choose another --output or pass --overwrite") from None
            placed.append(path)
    except EdgediffError:
        for p in placed:
            _unlink(p)
        raise
    except OSError as exc:
        for p in placed:
            _unlink(p)
        raise OutputWriteError(f"cannot write {exc.filename or paths[len(placed)]}: {os.strerror(exc.errno or 0)}; "
                               "nothing was written") from None
    except BaseException:
        for p in placed:
            _unlink(p)
        raise
    finally:
        for tmp in temps:
            _unlink(tmp)


def file_mode() -> int:
    """The mode a new file gets from the process umask (what `open(..., "w")` would give)."""
    return 0o666 & ~current_umask()


def png_bytes(image, parameters: dict[str, Any]) -> bytes:
    """PNG with the generation parameters in a tEXt chunk ("parameters", JSON)."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# -- helpers ------------------------------------------------------------------------------------------------------
def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _write_temp(path: Path, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; the user's umask decides, as for any other tool
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test that /proc, a read-only mount or a full inode table
    refuse in the same way the real write will."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgediff-probe.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputWriteError(f"cannot write to {folder}: {why}; choose another --output") from None


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _unlink(path) -> None:
    with contextlib.suppress(OSError):  # best effort: a leftover temp name is hidden and never a user's file
        os.unlink(path)
