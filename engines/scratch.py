"""Scratch files of the engine steps live inside OUT's staging folder (``bundle.writer``), never in the system temp
folder: a killed run then leaves them only there, where the next run for the same OUT sweeps them, and a full
disk is the output's disk, reported as such."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCRATCH_DIR = ".scratch"  # inside the staging folder; removed before the manifest is described


@contextmanager
def temp_files_in(folder: Path) -> Iterator[None]:
    """Point Python's ``tempfile`` at ``folder`` for the duration: ONNX Runtime's quantizer and transformer
    optimizer make their temporary folders with it and take no folder argument. Process-wide, so an engine step
    is not to be run from two threads at once (the CLI runs one)."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved
