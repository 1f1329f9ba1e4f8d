"""Writing a bundle folder safely: everything goes into a hidden temporary sibling of OUT, the manifest is written
last (it is the commit marker), files are fsynced, and the folder is renamed into place. An interrupted export or
quantization never leaves a half bundle at OUT, and nothing the user had there is lost: a non-empty OUT is refused
unless it is a bundle and ``overwrite`` is set, and the old bundle is deleted only after the new one is in place.
Used by ``edgediff export`` and by every ``edgediff.engines`` command."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import OutputExistsError
from . import layout
from .manifest import MANIFEST_NAME, Manifest


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds anything but an (overwritable) bundle, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
        if not ((out / MANIFEST_NAME).is_file() or (out / layout.MODEL_INDEX).is_file()):
            raise OutputExistsError(f"{out} is not a bundle; --overwrite only replaces bundles, never other folders")


@contextmanager
def staged_bundle(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder to fill; on normal exit it must hold the manifest, and it replaces ``out``.
    On an exception the temporary folder is removed and ``out`` is untouched."""
    out = Path(out).expanduser()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise RuntimeError(f"internal: {tmp} has no {MANIFEST_NAME}; nothing was committed")
        fsync_tree(tmp)
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, manifest: Manifest) -> None:
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for fn in files:
            with open(os.path.join(dirpath, fn), "rb") as f:
                os.fsync(f.fileno())


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. An existing bundle at ``out`` (only with overwrite) is moved aside first and
    deleted only after the new one is in place."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
