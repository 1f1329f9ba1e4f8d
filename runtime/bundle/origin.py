"""Who wrote a bundle folder that has no edgediff.json: optimum (described from its files, trust on first use), or
edgediff (its manifest was lost, so nothing it pinned can be checked any more, and the folder is refused).

Without this, deleting edgediff.json (or replacing it with a folder) silently turned a pinned bundle into a
trusted-on-first-use one: a flipped UNet byte then "verified". The signals are facts of how each tool writes:

- optimum saves each component's config with diffusers' ``ConfigMixin.save_config``, which always records
  ``_diffusers_version``; ``edgediff export`` writes the configs itself and drops diffusers' bookkeeping keys
  (export/pipeline_export.py ``_jsonable``), and the engine commands copy them byte for byte.
- optimum names the batch axis of every graph ``batch_size``; edgediff's exporter names it ``batch``.
- only edgediff's writer leaves ``edgediff.json.tmp`` (the manifest half-written when it was interrupted).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import layout
from .manifest import MANIFEST_NAME, Manifest

EDGEDIFF_BATCH_DIM = "batch"  # what export/components.py names axis 0; optimum writes "batch_size"


def config_traces(root: Path) -> str | None:
    """Why the folder's files say edgediff wrote it (before its graphs are read), or None."""
    if (root / f"{MANIFEST_NAME}.tmp").exists():
        return f"edgediff's writer left {MANIFEST_NAME}.tmp"
    try:
        unet = json.loads((root / layout.config_path("unet")).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None  # describing the folder reports the unreadable config with its own message
    if isinstance(unet, dict) and "_diffusers_version" not in unet:
        return (f"{layout.config_path('unet')} has no _diffusers_version: it was written by edgediff export, "
                "not by diffusers' save_config as optimum writes it")
    return None


def graph_traces(manifest: Manifest) -> str | None:
    """Why the described graphs say edgediff exported them, or None."""
    for comp in manifest.components.values():
        for spec in comp.inputs:
            if spec.shape and spec.shape[0] == EDGEDIFF_BATCH_DIM:
                return (f"{comp.model} names its batch axis {EDGEDIFF_BATCH_DIM!r} as edgediff export does "
                        "(optimum names it 'batch_size')")
    return None
