"""Derive ``<component>/weights_map.json`` (runtime/lora/weights_map.py) for an exported graph: which ONNX
initializer holds each Linear/Conv weight of the PyTorch model, and whether transposed.

Found by value, so the map is exact: each weight's bytes (and, for a 2-D weight, its transpose's) are hashed while
the PyTorch model is in memory; after it is freed, the graph's initializers of matching shapes are hashed and
matched. Equal digests and shapes mean equal tensors. When values alone cannot tell (a weight equal to another,
which torch.onnx stores once), the initializer consumed by a node of the module's own scope
(``/m/down_blocks.0/.../to_q/MatMul``) is taken; a weight still ambiguous, or not found unchanged (folded into
another tensor), is listed as ``unmapped`` and a LoRA on it is refused by name.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.lora.onnx_weights import GraphWeights
from edgediff.lora.weights_map import LORA_COMPONENTS, WeightEntry, WeightsMap, map_path


@dataclass(frozen=True)
class Fingerprint:
    shape: tuple[int, ...]  # the PyTorch parameter's
    digest: str
    digest_t: str | None  # of the transpose (2-D weights)


def fingerprints(component: str, model) -> dict[str, Fingerprint] | None:
    """Digests of every Linear/Conv2d weight of ``model`` (the diffusers/transformers model a row wraps), or None
    for components a LoRA cannot change."""
    import torch

    if component not in LORA_COMPONENTS:
        return None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = mod.weight.detach().to(torch.float32).cpu().contiguous().numpy()  # (out, in[, kh, kw])
            out[f"{name}.weight"] = Fingerprint(tuple(w.shape), _digest(w), _digest(w.T) if w.ndim == 2 else None)
    return out


def derive(component: str, prints: dict[str, Fingerprint], graph_path: Path) -> WeightsMap:
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    graph = GraphWeights(graph_path)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            consumers.setdefault(inp, []).append((node, i))
    del model
    shapes = {p.shape for p in prints.values()} | {p.shape[::-1] for p in prints.values() if p.digest_t}
    by_value: dict[tuple, list[str]] = {}
    for name in graph.names():
        info = graph.info_or_none(name)
        if info is not None and info.dtype == np.float32 and info.shape in shapes:
            by_value.setdefault((info.shape, _digest(graph.read(name))), []).append(name)
    entries, unmapped = {}, []
    for param, fp in prints.items():
        cands = [(n, False) for n in by_value.get((fp.shape, fp.digest), [])]
        if fp.digest_t is not None:
            cands += [(n, True) for n in by_value.get((fp.shape[::-1], fp.digest_t), [])]
        pick = _pick(param, cands, consumers)
        if pick is None:
            unmapped.append(param)
        else:
            entries[param] = WeightEntry(initializer=pick[0], transposed=pick[1], shape=fp.shape)
    return WeightsMap(component=component, weights=entries, unmapped=tuple(unmapped))


def write(root: Path, component: str, prints: dict[str, Fingerprint]) -> WeightsMap:
    wmap = derive(component, prints, root / component / "model.onnx")
    (root / map_path(component)).write_text(wmap.to_json(), encoding="utf-8")
    return wmap


def _pick(param: str, cands: list[tuple[str, bool]], consumers: dict) -> tuple[str, bool] | None:
    if not cands:
        return None
    names = {n for n, _ in cands}
    if len(names) > 1:  # equal values stored more than once: the one this module's nodes read
        scope = _scope(param)
        names = {n for n in names if any(node.name.startswith(scope) for node, _ in consumers.get(n, ()))}
        if len(names) != 1:
            return None
    (name,) = names
    layouts = {t for n, t in cands if n == name}
    if len(layouts) == 1:
        return name, layouts.pop()
    # a symmetric weight: its values cannot tell the layout, the operator reading it can
    layout = {_transposed_use(node, i) for node, i in consumers.get(name, ())} - {None}
    return (name, layout.pop()) if len(layout) == 1 else None


def _transposed_use(node, index: int) -> bool | None:
    """Whether ``node`` reads its input ``index`` as the transpose of a Linear's (out, in) weight."""
    if node.op_type == "MatMul" and index == 1:
        return True  # x @ W^T
    if node.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return not trans_b
    return None


def _scope(param: str) -> str:
    """torch.onnx's node-name scope of a parameter's module: ``down_blocks.0.attentions.0.proj_in.weight`` ->
    ``/m/down_blocks.0/attentions.0/proj_in/`` (list indices stay joined to their list)."""
    parts: list[str] = []
    for p in param.split(".")[:-1]:
        if p.isdigit() and parts:
            parts[-1] += f".{p}"
        else:
            parts.append(p)
    return "/m/" + "/".join(parts) + "/"


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()
