"""Test helper: a copy of a bundle with its scheduler config edited and re-pinned in its manifest, as `edgediff
export` writes a bundle whose source folder carries that scheduler config (e.g. a Turbo model's)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path


def with_scheduler_config(bundle: Path, dst: Path, **updates) -> Path:
    from edgediff.bundle import layout
    from edgediff.bundle.checksums import sha256_file
    from edgediff.bundle.manifest import FileEntry
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    shutil.copytree(bundle, dst)
    path = dst / layout.SCHEDULER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(updates)
    path.write_text(json.dumps(cfg))
    m = Bundle.open(bundle).manifest
    pinned = FileEntry(layout.SCHEDULER_CONFIG, path.stat().st_size, sha256_file(path, fresh=True))
    write_manifest(dst, dataclasses.replace(m, files=tuple(pinned if f.path == pinned.path else f for f in m.files)))
    return dst
