"""Open a bundle: an edgediff export (with ``edgediff.json``) or an optimum ONNX export (manifest derived).

Every path the bundle names is checked to stay inside it before any runtime sees a file, and every file the
runtime reads is pinned by the manifest and checked against its sha256 before it is used: a component's graph and
external data when it is opened (``Bundle.model_path``), configs and ``model_index.json`` when they are read
(``Bundle.file``, ``Bundle.open``), the tokenizer's files by name (``Bundle.tokenizer_files``). A file the
manifest does not pin is never read. The manifest itself is checked against its schema (schema.py) when read.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from .. import __version__
from ..config import read_json
from ..defaults import DEFAULT_STEPS, default_guidance
from ..errors import BundleError, BundleIntegrityError, BundleNotFound, ConfigError
from . import layout, origin
from .derived import latent_multiple
from .checksums import sha256_bytes, sha256_file
from .describe import describe
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Component, FileEntry, Manifest, Provenance
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
        if os.path.lexists(manifest_file):
            manifest, raw = _read_manifest(manifest_file)
            digest = sha256_bytes(raw)
            for entry in manifest.all_files():  # path safety of everything the manifest names, before any read
                resolve_inside(root, entry.path, what=f"{MANIFEST_NAME} entry")
            derived = False
        elif (root / layout.MODEL_INDEX).is_file() and (root / layout.graph_path("unet")).is_file():
            manifest = _describe_optimum(root)
            derived, digest = True, sha256_bytes(manifest.to_json().encode("utf-8"))
        elif (root / layout.MODEL_INDEX).is_file():
            raise BundleNotFound(
                f"{root} is a diffusers (PyTorch) pipeline, not an ONNX bundle; convert it: edgediff export {root} OUT"
            )
        else:
            raise BundleNotFound(f"{root} is not a bundle: it has neither {MANIFEST_NAME} nor {layout.MODEL_INDEX}")
        # model_index.json is read here, so it is checked here: a flipped byte refuses the bundle, not just --verify
        model_index = _json(root, _pinned_path(root, manifest, layout.MODEL_INDEX), layout.MODEL_INDEX)
        return cls(root=root, manifest=manifest, model_index=model_index, derived=derived, digest=digest)

    # -- derived values (one source each) -------------------------------------------------------------------
    @cached_property
    def denoiser(self) -> str:
        """The component a denoising step runs: the bundle's UNet or diffusion transformer (layout.DENOISERS)."""
        return next((name for name in layout.DENOISERS if self.has(name)), layout.DENOISERS[0])

    @cached_property
    def unet_config(self) -> dict[str, Any]:
        """The denoiser's diffusers config (a UNet's, or SD3/FLUX's transformer's: the name predates them)."""
        return self.config(layout.config_path(self.denoiser))

    @cached_property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this: VAE factor x the UNet's downsampling, or x the
        transformer's patch size (it cuts the latent grid into patch_size x patch_size tokens). FLUX packs 2x2
        latent cells into one token's channels before its transformer (patch_size 1, in_channels = 4 x the
        latent channels, as FluxPipeline reads them): a token then spans sqrt(in_channels / latent channels)."""
        if self.denoiser != "unet":
            cfg = self.unet_config
            packed = math.isqrt(max(1, int(cfg.get("in_channels", 0)) // self.manifest.latent_channels))
            return self.manifest.vae_scale_factor * int(cfg.get("patch_size", 1)) * max(1, packed)
        return latent_multiple(self.manifest.vae_scale_factor, self.unet_config.get("block_out_channels", [0]))

    @property
    def default_steps(self) -> int:
        """The bundle's recommended step count, else the runtime's DEFAULT_STEPS."""
        d = self.manifest.defaults.steps
        return DEFAULT_STEPS if d is None else d

    @property
    def default_guidance(self) -> float:
        """The bundle's recommended guidance scale, else its family's diffusers default (runtime/defaults.py)."""
        d = self.manifest.defaults.guidance_scale
        return default_guidance(self.manifest.family) if d is None else d

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
        """Path of component ``name``'s graph, after checking that its parity receipt records a pass, that its
        external data stays inside the bundle and is pinned, and (by default) that every file of it matches the
        manifest."""
        comp = self.component(name)
        if (failed := receipt_failure(comp)) is not None:
            raise BundleIntegrityError(f"{self.root}: {failed}; re-export or re-derive the bundle")
        if verify:
            problems = [p for p in (self._check(f, hash_it=True) for f in comp.files) if p]
            if problems:
                raise BundleIntegrityError(f"{problems[0]}; re-export or re-copy the bundle")
        if (unpinned := self._unpinned_external_data(comp)) is not None:
            raise BundleIntegrityError(f"{unpinned}; re-export the bundle")
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
        return _json(self.root, self.file(rel), rel)

    def tokenizer_files(self, which: str = layout.TOKENIZER_DIR) -> dict[str, Path]:
        """The tokenizer's files, by name (``vocab.json`` -> path), each pinned and checked: exactly what
        ``ClipTokenizer.from_files`` reads. A file in the folder that the manifest does not pin is left out."""
        out = {}
        for f in self.manifest.files:
            rel = PurePosixPath(f.path)
            if str(rel.parent) == which and rel.name in layout.TOKENIZER_FILES:
                out[rel.name] = self.file(f.path)
        if not out:
            raise BundleError(f"{self.root}: the manifest pins no tokenizer files under {which}/ (expected "
                              "vocab.json + merges.txt, or tokenizer.json); re-export the bundle")
        return out

    def tokenizer_dir(self, which: str = layout.TOKENIZER_DIR) -> Path:
        """The tokenizer folder, for readers that scan it (``ClipTokenizer.from_dir``): its pinned files are
        checked, and a tokenizer file there that the manifest does not pin is refused (it would be read
        unchecked: an unpinned tokenizer.json overrides vocab.json/merges.txt). Prefer ``tokenizer_files``."""
        self.tokenizer_files(which)
        if (unpinned := self._unpinned_tokenizer_files(which)):
            raise BundleIntegrityError(f"{unpinned[0]}; delete it or re-export the bundle")
        return resolve_inside(self.root, which, what=which)

    # -- verification ----------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Check the bundle against its manifest, re-reading every byte (no cached hashes); one line per missing,
        truncated or altered file, parity receipt that records a failure, external-data file outside the bundle
        or not pinned, and tokenizer file the manifest does not pin. [] means every file matches.

        A bundle without edgediff.json (an optimum export) has nothing to verify against: BundleIntegrityError,
        never an empty list that would read as "verified"."""
        if self.derived:
            raise BundleIntegrityError(
                f"{self.root} has no {MANIFEST_NAME}: nothing to verify its files against (an optimum export pins no "
                "checksums; its files are trusted as found). Verified bundles are made by edgediff export")
        problems = [p for p in (self._check(f, hash_it=True, fresh=True) for f in self.manifest.all_files()) if p]
        broken = {p.split(":", 1)[0] for p in problems}
        for comp in self.manifest.components.values():
            if (failed := receipt_failure(comp)) is not None:
                problems.append(failed)
            if not broken.intersection(f.path for f in comp.files):  # an altered graph is reported once, above
                try:
                    if (unpinned := self._unpinned_external_data(comp)) is not None:
                        problems.append(unpinned)
                except BundleError as exc:  # escapes (UnsafePathError) and unreadable graphs: what load says
                    problems.append(str(exc))
        for which in (layout.TOKENIZER_DIR, layout.TOKENIZER_2_DIR, layout.TOKENIZER_3_DIR):
            problems.extend(self._unpinned_tokenizer_files(which))
        return problems

    def _check(self, entry: FileEntry, *, hash_it: bool, fresh: bool = False) -> str | None:
        return check_entry(self.root, entry, hash_it=hash_it, fresh=fresh)

    def _unpinned_external_data(self, comp: Component) -> str | None:
        pinned = {f.path for f in comp.files}
        for rel in check_external_data(self.root, comp.model):  # raises UnsafePathError on an escape
            if rel not in pinned:
                return f"{comp.model}: external data {rel} is not pinned by {MANIFEST_NAME}"
        return None

    def _unpinned_tokenizer_files(self, which: str) -> list[str]:
        pinned = {f.path for f in self.manifest.files}
        return [f"{which}/{name}: not pinned by {MANIFEST_NAME}, and the tokenizer would read it"
                for name in layout.TOKENIZER_FILES
                if f"{which}/{name}" not in pinned and os.path.lexists(self.root / which / name)]


def check_entry(root: Path, entry: FileEntry, *, hash_it: bool, fresh: bool = False) -> str | None:
    """One line saying how ``entry``'s file differs from the manifest, or None when it matches."""
    path = resolve_inside(root, entry.path, what=entry.path)
    try:
        if not path.is_file():
            return f"{entry.path}: missing"
        size = path.stat().st_size
        if size != entry.size:
            kind = "truncated" if size < entry.size else "grown"
            return f"{entry.path}: {kind} ({size} bytes, manifest says {entry.size})"
        if hash_it and sha256_file(path, fresh=fresh) != entry.sha256:
            return f"{entry.path}: altered (sha256 does not match the manifest)"
    except OSError as exc:  # unreadable, or a name the filesystem refuses (too long)
        return f"{entry.path}: cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def receipt_failure(comp: Component) -> str | None:
    """A line naming the component, metric, value and tolerance when its parity receipt records a failure.
    Neither the exporter nor the engine commands write a failing receipt (they refuse, and a receipt made with an
    accepted ``--tolerance`` records that tolerance), so one on disk means the manifest was altered."""
    r = comp.parity
    if r is None or r.passed:
        return None
    value = r.max_rel if r.metric == "max_rel" else r.rel_l2
    shown = "not recorded" if value is None else f"{value:.3g}"
    return (f"{comp.name}: its parity receipt records a failure ({r.metric} {shown} over the tolerance "
            f"{r.tolerance:g}, vs {r.reference})")


# -- helpers of open ---------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> tuple[Manifest, bytes]:
    """edgediff.json must be a regular file of the bundle: a folder, symlink or device in its place is refused
    (a folder used to make the reader fall back to trusting the files as found)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{path} is a symlink; a bundle's manifest must be a regular file inside it (copy the "
                          "file, not a link)")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file; a bundle's manifest is the file {MANIFEST_NAME} "
                          "(re-copy or re-export the bundle)")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {st.st_size} bytes; a manifest is a few KB (limit {MAX_MANIFEST_BYTES})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Manifest.from_json(raw), raw
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None


def _describe_optimum(root: Path) -> Manifest:
    """The manifest of an optimum export, derived from its files; refused when the folder is an edgediff bundle
    that lost its manifest (origin.py says how that is told)."""
    lost = (f"{root} has no {MANIFEST_NAME}, but edgediff wrote this bundle ({{why}}): without its manifest "
            f"nothing it pinned can be checked. Restore {MANIFEST_NAME} from the original copy, or re-export")
    if (why := origin.config_traces(root)) is not None:
        raise BundleIntegrityError(lost.format(why=why))
    manifest = describe(root, Provenance(exporter=f"optimum (manifest derived by edgediff {__version__})"))
    if (why := origin.graph_traces(manifest)) is not None:
        raise BundleIntegrityError(lost.format(why=why))
    return manifest


def _pinned_path(root: Path, manifest: Manifest, rel: str) -> Path:
    entry = next((f for f in manifest.files if f.path == rel), None)
    if entry is None:
        raise BundleError(f"{root}: {rel} is not pinned by the manifest; re-export the bundle")
    if (problem := check_entry(root, entry, hash_it=True)) is not None:
        raise BundleIntegrityError(f"{root}: {problem}; re-export or re-copy the bundle")
    return resolve_inside(root, rel, what=rel)


def _json(root: Path, path: Path, rel: str) -> dict[str, Any]:
    try:
        return read_json(path, what=rel)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
