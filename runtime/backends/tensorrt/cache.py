"""The on-disk TensorRT engine cache: its layout, its key, and both its sides.

An engine (a serialized "plan") is only valid for the exact ONNX graph, TensorRT version, GPU model and compute
capability, optimization profile and builder flags it was built with. All of these form the ``EngineKey``; its
digest names the files, so a changed input can never pick up a stale plan:

    <engine_dir>/<component>-<digest16>.plan        the plan, renamed into place after fsync
    <engine_dir>/<component>-<digest16>.meta.json   written last: the commit marker, with the plan's sha256
    <engine_dir>/<component>.lock                   flock held by a builder, so two builders never race

A plan without its meta (a builder killed mid-write), a plan whose size or sha256 differs from its meta, or a meta
that names another GPU/TensorRT is never deserialized: loading raises with the command that rebuilds it.

The reading side (``load``/``select``, for the runtime) and the writing side (``lock``/``store``, for
``edgediff build`` in engines/) stay one class in the core: the meta written by ``store`` is the format that ``load``
verifies, so both live next to each other, and the writing side needs only the standard library.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..._version import __version__
from ...errors import EngineError, EngineIncompatible

META_VERSION = 1


class EngineNotBuilt(EngineError):
    """No usable engine is cached for this key."""


@dataclass(frozen=True)
class EngineKey:
    component: str
    onnx_sha256: str  # of the component's graph file (the manifest's entry)
    tensorrt: str  # tensorrt.__version__
    gpu: str  # device name, e.g. "Orin" or "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "8.7"
    profile: dict[str, Any] = field(default_factory=dict)  # ShapeRange.describe()
    flags: dict[str, Any] = field(default_factory=dict)  # opt level, workspace, refit, version-compatible, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def stem(self) -> str:
        return f"{self.component}-{self.digest[:16]}"


def graph_digest(component) -> str:
    """One digest over a component's graph and external-data files, from the manifest's sha256 entries."""
    return hashlib.sha256("".join(f.sha256 for f in component.files).encode()).hexdigest()


def rebuild_command(bundle_root: str | Path, engine_dir: str | Path | None) -> str:
    """The command quoted when a cached engine is missing or refused."""
    where = f" --engine-dir {engine_dir}" if engine_dir else ""
    return f"edgediff build {bundle_root}{where} --force"


def default_engine_dir(bundle_digest: str) -> Path:
    """Per-user cache, one folder per bundle (engines never go inside the bundle: it stays hash-pinned)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgediff" / "engines" / bundle_digest[:16]


class EngineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def plan_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}.plan"

    def meta_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}.meta.json"

    # -- writing ----------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, component: str) -> Iterator[None]:
        """Exclusive per-component lock across processes (released by the OS if the holder dies)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{component}.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def store(self, key: EngineKey, plan: bytes, *, build_seconds: float | None = None) -> Path:
        """Write the plan, then its meta (the commit marker); both atomically. Returns the plan path."""
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(plan).hexdigest()
        write_durably(self.plan_path(key), plan)
        meta = {"meta_version": META_VERSION, "key": key.to_dict(), "key_digest": key.digest,
                "plan_sha256": digest, "plan_bytes": len(plan), "built_by": f"edgediff {__version__}",
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": build_seconds}
        write_durably(self.meta_path(key), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return self.plan_path(key)

    # -- reading ----------------------------------------------------------------------------------------------
    def load(self, key: EngineKey, rebuild: str) -> bytes:
        """The plan for ``key``, verified against its meta; ``rebuild`` is the command to quote on refusal."""
        meta_path, plan_path = self.meta_path(key), self.plan_path(key)
        if not meta_path.is_file():
            other = self._closest(key)
            if other is not None:
                raise EngineIncompatible(f"{key.component}: the cached engine {other[0].name} {other[1]}; "
                                         f"rebuild it: {rebuild}")
            raise EngineNotBuilt(f"{key.component}: no TensorRT engine in {self.root} for this bundle, GPU and "
                                 f"profile; build it: {rebuild}")
        meta = self._read_meta(meta_path, rebuild)
        if meta.get("key") != key.to_dict():
            raise EngineIncompatible(f"{meta_path.name} does not describe this engine ({_difference(meta.get('key'), key)}); "
                                     f"rebuild it: {rebuild}")
        if not plan_path.is_file():
            raise EngineNotBuilt(f"{key.component}: {plan_path.name} is missing although its meta exists; "
                                 f"rebuild it: {rebuild}")
        size = plan_path.stat().st_size
        if size != meta.get("plan_bytes"):
            raise EngineIncompatible(f"{plan_path.name} is {size} bytes, its meta says {meta.get('plan_bytes')} "
                                     f"(truncated or replaced); rebuild it: {rebuild}")
        plan = plan_path.read_bytes()
        if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            raise EngineIncompatible(f"{plan_path.name} does not match the sha256 in its meta (altered); "
                                     f"rebuild it: {rebuild}")
        return plan

    def select(self, component: str, onnx_sha256: str, tensorrt: str, gpu: str, compute_capability: str,
               rebuild: str) -> bytes:
        """The runtime's lookup: the newest committed engine for this graph built by this TensorRT on this GPU
        model (any profile/flags -- the profile is checked when shapes are set), verified like ``load``."""
        candidates = [m for m in self.entries() if (m.get("key") or {}).get("component") == component
                      and m["key"].get("onnx_sha256") == onnx_sha256]
        if not candidates:
            raise EngineNotBuilt(f"{component}: no TensorRT engine in {self.root} for this bundle; build it: "
                                 f"{rebuild.replace(' --force', '')}")
        here = {"tensorrt": tensorrt, "gpu": gpu, "compute_capability": compute_capability}
        usable = [m for m in candidates if all(m["key"].get(k) == v for k, v in here.items())]
        if not usable:
            k = candidates[-1]["key"]
            diff = next(f"{label} {k.get(f)!r}; this machine has {here[f]!r}" for f, label in
                        (("tensorrt", "TensorRT"), ("gpu", "GPU"), ("compute_capability", "compute capability"))
                        if k.get(f) != here[f])
            raise EngineIncompatible(f"{component}: the cached engine was built for {diff}; rebuild it: {rebuild}")
        newest = max(usable, key=lambda m: m.get("built_at") or "")
        return self.load(EngineKey(**newest["key"]), rebuild)

    def entries(self) -> list[dict]:
        """Every committed engine's meta (for ``edgediff doctor``), unreadable ones marked."""
        out = []
        for p in sorted(self.root.glob("*.meta.json")) if self.root.is_dir() else []:
            try:
                meta = json.loads(p.read_text(encoding="utf-8"))
                meta["_meta_file"] = str(p)
                out.append(meta)
            except (OSError, ValueError):
                out.append({"_meta_file": str(p), "_error": "unreadable meta"})
        return out

    def _read_meta(self, path: Path, rebuild: str) -> dict:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise EngineIncompatible(f"{path.name} is unreadable; rebuild it: {rebuild}") from None
        if not isinstance(meta, dict) or meta.get("meta_version") != META_VERSION:
            raise EngineIncompatible(f"{path.name} was written by another edgediff version; rebuild it: {rebuild}")
        return meta

    def _closest(self, key: EngineKey) -> tuple[Path, str] | None:
        """A committed engine for the same component and graph but another GPU/TensorRT/profile: say what differs."""
        for meta in self.entries():
            other = meta.get("key") or {}
            if other.get("component") == key.component and other.get("onnx_sha256") == key.onnx_sha256:
                return Path(meta["_meta_file"]), _difference(other, key)
        return None


def _difference(other: dict | None, key: EngineKey) -> str:
    other = other or {}
    mine = key.to_dict()
    labels = {"tensorrt": "TensorRT", "gpu": "GPU", "compute_capability": "compute capability",
              "onnx_sha256": "ONNX graph", "profile": "profile", "flags": "builder flags", "component": "component"}
    for k, label in labels.items():
        if other.get(k) != mine.get(k):
            if k in ("profile", "flags", "onnx_sha256"):
                return f"was built for another {label}"
            return f"was built for {label} {other.get(k)!r}; this machine has {mine.get(k)!r}"
    return "differs"


def write_durably(path: Path, data: bytes) -> None:
    """Atomic (temp file + rename) and durable (fsync of the file and its folder): a crash leaves the old file or the
    new one, never half of one. Also used for the builder's timing cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()
