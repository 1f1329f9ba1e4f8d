"""``<component>/weights_map.json``: where each PyTorch weight of a component lives in its exported ONNX graph.

torch.onnx names a Conv weight after its module (``m.down_blocks.0.resnets.0.conv1.weight``) but stores a Linear
weight under MatMul transposed, with a generated name (``onnx::MatMul_2370``). The exporter records, per component,
the parameter name diffusers/transformers use (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``)
-> the initializer that holds it and whether it is stored transposed, found by matching the tensors' values (so the
map is exact, not guessed from names). LoRA hot-swap (ONNX Runtime initializer overrides, TensorRT refit) reads it;
a bundle without it cannot be hot-swapped. The file is pinned by the manifest like every other file.

    {"format": "edgediff-weights-map", "version": 1, "component": "unet",
     "weights": {"<param>": {"initializer": "onnx::MatMul_2370", "transposed": true, "shape": [320, 320]}, ...},
     "unmapped": ["<param>", ...]}

``shape`` is the PyTorch parameter's ((out, in) or (out, in, kh, kw)); ``unmapped`` lists Linear/Conv weights the
exporter could not find unchanged in the graph (folded into another tensor), so a LoRA on them is refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import BundleError, BundleIntegrityError

if TYPE_CHECKING:
    from ..bundle.reader import Bundle

FORMAT = "edgediff-weights-map"
VERSION = 1
FILE_NAME = "weights_map.json"
# the components a LoRA can change (the VAE has no LoRA layers)
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def map_path(component: str) -> str:
    return f"{component}/{FILE_NAME}"


@dataclass(frozen=True)
class WeightEntry:
    initializer: str  # the ONNX initializer's name
    transposed: bool  # the graph stores the (out, in) weight as (in, out) (Linear under MatMul)
    shape: tuple[int, ...]  # the PyTorch parameter's shape


@dataclass(frozen=True)
class WeightsMap:
    component: str
    weights: dict[str, WeightEntry]  # PyTorch parameter name (``...to_q.weight``) -> where it lives
    unmapped: tuple[str, ...] = ()
    _sharing: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "component": self.component,
                           "weights": {k: {"initializer": e.initializer, "transposed": e.transposed,
                                           "shape": list(e.shape)} for k, e in sorted(self.weights.items())},
                           "unmapped": sorted(self.unmapped)}, indent=1, sort_keys=True) + "\n"

    def sharing(self, initializer: str) -> tuple[str, ...]:
        """Every parameter held by ``initializer`` (more than one when torch.onnx deduplicated equal values)."""
        if not self._sharing:
            by: dict[str, list[str]] = {}
            for name, e in self.weights.items():
                by.setdefault(e.initializer, []).append(name)
            self._sharing.update({k: tuple(sorted(v)) for k, v in by.items()})
        return self._sharing.get(initializer, ())

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str) -> "WeightsMap":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise BundleError(f"{where} is not valid JSON; re-export the bundle") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{where} is not an edgediff weights map; re-export the bundle")
        if data.get("version") != VERSION:
            raise BundleError(f"{where}: weights map version {data.get('version')!r}; this edgediff reads "
                              f"{VERSION}: upgrade edgediff or re-export the bundle")
        weights, component = data.get("weights"), data.get("component")
        unmapped = data.get("unmapped", [])
        if not isinstance(weights, dict) or not isinstance(component, str) or not isinstance(unmapped, list):
            raise BundleError(f"{where}: malformed weights map (component, weights, unmapped); re-export the bundle")
        out = {}
        for name, e in weights.items():
            out[name] = _entry(e, f"{where}: {name}")
        return cls(component=component, weights=out, unmapped=tuple(str(u) for u in unmapped))


def _entry(e: Any, where: str) -> WeightEntry:
    ok = (isinstance(e, dict) and isinstance(e.get("initializer"), str) and isinstance(e.get("transposed"), bool)
          and isinstance(e.get("shape"), list) and len(e["shape"]) in (2, 4)
          and all(type(d) is int and d > 0 for d in e["shape"]))
    if not ok:
        raise BundleError(f"{where}: malformed entry (initializer, transposed, shape); re-export the bundle")
    if e["transposed"] and len(e["shape"]) != 2:
        raise BundleError(f"{where}: only 2-D weights can be stored transposed; re-export the bundle")
    return WeightEntry(initializer=e["initializer"], transposed=e["transposed"], shape=tuple(e["shape"]))


def load_weights_map(bundle: "Bundle", component: str, *, verify: bool = True) -> WeightsMap:
    """The pinned map of ``component``; BundleError saying to re-export when the bundle has none."""
    rel = map_path(component)
    if not any(f.path == rel for f in bundle.manifest.files):
        raise BundleError(f"{bundle.root}: {component} has no {FILE_NAME}, which LoRA hot-swap needs to find the "
                          "weights in its graph; re-export the bundle with this edgediff (edgediff export), or fuse "
                          "the LoRA at export (edgediff export --lora)")
    path = bundle.file(rel, verify=verify)  # checked against the manifest's sha256
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BundleIntegrityError(f"cannot read {path}: {exc.strerror or exc}") from None
    m = WeightsMap.from_json(text, where=rel)
    if m.component != component:
        raise BundleError(f"{rel} describes {m.component!r}, not {component!r}; re-export the bundle")
    return m

