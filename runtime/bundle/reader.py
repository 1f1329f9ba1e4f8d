"""Open a bundle: an edgediff export (with ``edgediff.json``) or an optimum ONNX export (manifest derived).

Every path the bundle names is checked to stay inside it before any runtime sees a file, and a component's files
are checked against their sha256 when the component is opened (``Bundle.model_path``), so a truncated or altered
graph is refused with its name instead of being half-loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import read_json
from ..defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS
from ..errors import BundleError, BundleIntegrityError, BundleNotFound, ConfigError
from . import layout
from .derived import latent_multiple
from .checksums import sha256_bytes, sha256_file
from .describe import describe
from .manifest import MANIFEST_NAME, Component, FileEntry, Manifest, Provenance
from .safety import check_external_data, resolve_inside


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    model_index: dict[str, Any]
    derived: bool  # True when the manifest was derived from an optimum export (no edgediff.json on disk)
    digest: str  # sha256 of the manifest: names this exact bundle (PNG metadata, engine caches)

    # -- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        root = Path(path).expanduser()
        if not root.exists():
            raise BundleNotFound(f"bundle not found: {root} does not exist")
        if not root.is_dir():
            raise BundleNotFound(f"{root} is a file; a bundle is a folder (made by `edgediff export`)")
        manifest_file = root / MANIFEST_NAME
        if manifest_file.is_file():
            text = manifest_file.read_text(encoding="utf-8")
            try:
                manifest = Manifest.from_json(text)
            except BundleError as exc:
                raise BundleError(f"{manifest_file}: {exc}") from None
            derived, digest = False, sha256_bytes(text.encode("utf-8"))
            for entry in manifest.all_files():  # path safety of everything the manifest names, before any read
                resolve_inside(root, entry.path, what=f"{MANIFEST_NAME} entry")
        elif (root / layout.MODEL_INDEX).is_file() and (root / layout.graph_path("unet")).is_file():
            manifest = describe(root, Provenance(exporter=f"optimum (manifest derived by edgediff {__version__})"))
            derived, digest = True, sha256_bytes(manifest.to_json().encode("utf-8"))
        elif (root / layout.MODEL_INDEX).is_file():
            raise BundleNotFound(
                f"{root} is a diffusers (PyTorch) pipeline, not an ONNX bundle; convert it: edgediff export {root} OUT"
            )
        else:
            raise BundleNotFound(f"{root} is not a bundle: it has neither {MANIFEST_NAME} nor {layout.MODEL_INDEX}")
        try:
            model_index = read_json(root / layout.MODEL_INDEX, what=layout.MODEL_INDEX)
        except ConfigError as exc:
            raise BundleError(str(exc)) from None
        return cls(root=root, manifest=manifest, model_index=model_index, derived=derived, digest=digest)

    # -- derived values (one source each) -------------------------------------------------------------------
    @cached_property
    def unet_config(self) -> dict[str, Any]:
        return self.config(layout.config_path("unet"))

    @cached_property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE factor x the UNet's downsampling)."""
        return latent_multiple(self.manifest.vae_scale_factor, self.unet_config.get("block_out_channels", [0]))

    @property
    def default_steps(self) -> int:
        """The bundle's recommended step count, else the runtime's DEFAULT_STEPS."""
        d = self.manifest.defaults.steps
        return DEFAULT_STEPS if d is None else d

    @property
    def default_guidance(self) -> float:
        """The bundle's recommended guidance scale, else the runtime's DEFAULT_GUIDANCE."""
        d = self.manifest.defaults.guidance_scale
        return DEFAULT_GUIDANCE if d is None else d

    # -- access ----------------------------------------------------------------------------------------------
    def component(self, name: str) -> Component:
        try:
            return self.manifest.components[name]
        except KeyError:
            have = sorted(self.manifest.components)
            raise BundleError(f"{self.root}: no {name!r} component (has {have})") from None

    def has(self, name: str) -> bool:
        return name in self.manifest.components

    def model_path(self, name: str, *, verify: bool = True) -> Path:
        """Path of component ``name``'s graph, after checking its external data stays inside the bundle and (by
        default) that every file of it matches the manifest."""
        comp = self.component(name)
        if verify:
            problems = [p for p in (self._check(f, hash_it=True) for f in comp.files) if p]
            if problems:
                raise BundleIntegrityError(f"{problems[0]}; re-export or re-copy the bundle")
        check_external_data(self.root, comp.model)
        return resolve_inside(self.root, comp.model, what=comp.model)

    def file(self, rel: str, *, verify: bool = True) -> Path:
        """A pinned non-graph file (config, tokenizer), checked against the manifest."""
        entry = next((f for f in self.manifest.files if f.path == rel), None)
        if entry is None:
            raise BundleError(f"{self.root}: {rel} is not part of the bundle manifest")
        if verify and (problem := self._check(entry, hash_it=True)):
            raise BundleIntegrityError(f"{problem}; re-export or re-copy the bundle")
        return resolve_inside(self.root, rel, what=rel)

    def config(self, rel: str) -> dict[str, Any]:
        try:
            return read_json(self.file(rel), what=rel)
        except ConfigError as exc:
            raise BundleError(str(exc)) from None

    def tokenizer_dir(self, which: str = layout.TOKENIZER_DIR) -> Path:
        for f in self.manifest.files:
            if f.path.startswith(which + "/"):
                self.file(f.path)  # verify every pinned tokenizer file
        return resolve_inside(self.root, which, what=which)

    # -- verification ----------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check every file against the manifest, re-reading every byte (no cached hashes); one line per missing,
        truncated or altered file."""
        return [p for p in (self._check(f, hash_it=True, fresh=True) for f in self.manifest.all_files()) if p]

    def _check(self, entry: FileEntry, *, hash_it: bool, fresh: bool = False) -> str | None:
        path = resolve_inside(self.root, entry.path, what=entry.path)
        if not path.is_file():
            return f"{entry.path}: missing"
        size = path.stat().st_size
        if size != entry.size:
            kind = "truncated" if size < entry.size else "grown"
            return f"{entry.path}: {kind} ({size} bytes, manifest says {entry.size})"
        if hash_it and sha256_file(path, fresh=fresh) != entry.sha256:
            return f"{entry.path}: altered (sha256 does not match the manifest)"
        return None
