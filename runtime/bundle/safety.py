"""Path safety: every file a bundle names must lie inside the bundle.

Checked before ONNX Runtime or TensorRT opens anything, because both follow an ONNX graph's external-data
``location`` wherever it points (an absolute path, ``../../etc``, or a symlink to elsewhere).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import BundleError, UnsafePathError


def resolve_inside(root: Path, rel: str, *, what: str) -> Path:
    """Return ``root/rel`` if it stays inside ``root`` after resolving symlinks, else raise UnsafePathError."""
    pure = PurePosixPath(rel.replace("\\", "/"))
    if not rel or pure.is_absolute() or os.path.isabs(rel) or (len(rel) > 1 and rel[1] == ":"):
        raise UnsafePathError(f"{what}: path {rel!r} is absolute; bundle paths must be relative to the bundle")
    if ".." in pure.parts:
        raise UnsafePathError(f"{what}: path {rel!r} climbs out with '..'; bundle paths must stay inside the bundle")
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / Path(*pure.parts)))
    if target != root_real and root_real not in target.parents:
        raise UnsafePathError(f"{what}: path {rel!r} resolves to {target}, outside the bundle {root_real} (symlink?)")
    return target


def external_data_locations(model_path: Path) -> list[str]:
    """The ``location`` of every external-data tensor an ONNX file references (graph, subgraphs, attributes)."""
    import onnx  # base dependency; imported here to keep `import edgediff` light

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends: a corrupt or truncated graph
        raise BundleError(f"{model_path}: not a readable ONNX file ({type(exc).__name__}); re-export the bundle") from None
    locations: list[str] = []

    def visit_tensor(t) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            locations.append(entries.get("location", ""))

    def visit_graph(g) -> None:
        for t in g.initializer:
            visit_tensor(t)
        for t in g.sparse_initializer:
            visit_tensor(t.values)
            visit_tensor(t.indices)
        for node in g.node:
            for a in node.attribute:
                if a.HasField("t"):
                    visit_tensor(a.t)
                for t in a.tensors:
                    visit_tensor(t)
                if a.HasField("g"):
                    visit_graph(a.g)
                for sub in a.graphs:
                    visit_graph(sub)

    visit_graph(model.graph)
    return sorted(set(locations))


def check_external_data(root: Path, model_rel: str) -> list[str]:
    """Check that the external data of bundle graph ``model_rel`` stays inside ``root``; return bundle-relative paths.

    ONNX resolves ``location`` relative to the graph's own folder.
    """
    model_path = resolve_inside(root, model_rel, what=model_rel)
    folder = PurePosixPath(model_rel).parent
    out = []
    for loc in external_data_locations(model_path):
        if not loc or PurePosixPath(loc.replace("\\", "/")).is_absolute() or os.path.isabs(loc):
            raise UnsafePathError(f"{model_rel}: external data location {loc!r} is absolute; refusing to load it")
        rel = str(folder / loc) if str(folder) != "." else loc
        # normalise without touching the filesystem, then check containment (this also catches '..' escapes)
        norm = os.path.normpath(rel).replace(os.sep, "/")
        if norm.startswith("../") or norm == "..":
            raise UnsafePathError(f"{model_rel}: external data location {loc!r} escapes the bundle; refusing to load it")
        resolve_inside(root, norm, what=f"{model_rel} external data")
        out.append(norm)
    return out
