"""The bundle manifest (``edgediff.json``): what every other part of edgediff reads about a model bundle.

Format (version 1) is documented in docs/bundle.md. Kept as frozen dataclasses so that a manifest is data:
``Manifest.from_json(Manifest.to_json(m)) == m``. Shapes use ints for fixed dims and names for symbolic ones
(``"batch"``, ``"height"``, ``"width"``, ``"sequence"``), which is also what TensorRT profiles are derived from.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import BundleError
from .schema import COMPONENTS, DTYPES, FAMILIES, OPTIMIZED_FOR, PRECISIONS, PREDICTION_TYPES, check_manifest, is_component

FORMAT_VERSION = 1
MANIFEST_NAME = "edgediff.json"

# The allowed values (FAMILIES, PRECISIONS, COMPONENTS, DTYPES, ...) live with the schema that checks them
# (schema.py) and are imported from here by every reader; the families this runtime runs are the keys of
# edgediff.families.CONDITIONERS.
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; refuse to parse a planted gigabyte

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, and shape (int = fixed, str = symbolic dim)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BundleError(f"tensor {self.name!r}: dtype {self.dtype!r}; expected one of {list(DTYPES)}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle, pinned by size and sha256. ``path`` is POSIX and relative to the bundle root."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ParityReceipt:
    """How closely an exported/transformed component reproduces its reference on the same random inputs."""

    reference: str  # what it was compared with, e.g. "torch 2.13.0 / diffusers 0.42.1 UNet2DConditionModel"
    max_abs: float
    max_rel: float  # max |a - b| / (max |b| + eps): relative to the reference's scale, robust near zero
    tolerance: float  # the bound on ``metric`` that the exporter / engine command enforced
    inputs: dict[str, list[int]] = field(default_factory=dict)  # shapes of the random inputs used
    # "max_rel" for fp32/fp16 graphs; "rel_l2" (||a - b|| / ||b||) for quantized ones, whose error is spread
    # over every element by design, so the worst single element says little about the image.
    metric: str = "max_rel"
    rel_l2: float | None = None

    @property
    def passed(self) -> bool:
        value = self.max_rel if self.metric == "max_rel" else self.rel_l2
        return value is not None and value <= self.tolerance


@dataclass(frozen=True)
class Component:
    name: str  # folder name, one of COMPONENTS
    model: str  # relative path of the .onnx graph
    files: tuple[FileEntry, ...]  # the graph first, then its external-data files
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    parity: ParityReceipt | None = None
    # "" = a portable graph. "cpu" / "cuda": saved by ONNX Runtime after its own graph optimizations for that
    # provider (edgediff optimize --target), so the runtime opens it with optimizations off (fast cold start);
    # such a graph may hold provider-specific fused ops and is refused by other providers.
    optimized_for: str = ""

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise BundleError(f"component {self.name!r} has no input {name!r}; it has {[s.name for s in self.inputs]}")

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise BundleError(f"component {self.name!r} has no output {name!r}; it has {[s.name for s in self.outputs]}")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Provenance:
    exporter: str  # "edgediff <version>", "optimum (derived by edgediff <version>)", "edgediff quantize ..."
    libraries: dict[str, str] = field(default_factory=dict)  # name -> version used to produce the bundle
    source: str = ""  # source pipeline path (or parent bundle) as given by the user
    source_class: str = ""  # e.g. "StableDiffusionPipeline"
    parent: str = ""  # sha256 of the parent bundle's manifest for engine-derived bundles
    transforms: tuple[str, ...] = ()  # engine steps applied since export, oldest first ("optimize --target cpu")


@dataclass(frozen=True)
class GenerationDefaults:
    """The settings the model's producer recommends, used when a call names none (diffusers leaves these to model
    cards: a distilled model wants 4 steps and no guidance, the built-in shapes model 20 steps at guidance 5).
    Either may be None: the runtime's own default then applies."""
    steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        s, g = self.steps, self.guidance_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 1000):
            raise BundleError(f"defaults.steps {s!r}; expected an integer from 1 to 1000")
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g < 1e6):
            raise BundleError(f"defaults.guidance_scale {g!r}; expected a finite number >= 0")


@dataclass(frozen=True)
class Manifest:
    family: str
    prediction_type: str  # epsilon | v_prediction | sample (what the denoiser predicts)
    default_height: int
    default_width: int
    latent_channels: int
    vae_scale_factor: int  # 2 ** (len(vae.block_out_channels) - 1)
    scaling_factor: float  # from the VAE config; never hard-coded
    text_max_length: int  # tokenizer's model_max_length = text encoder's max_position_embeddings
    components: dict[str, Component]
    files: tuple[FileEntry, ...]  # every non-graph file: model_index.json, configs, tokenizer, scheduler
    provenance: Provenance
    shift_factor: float | None = None  # reserved (VAEs with a shift, e.g. SD3/FLUX); None = no shift
    # the longest T5 token sequence the bundle was exported for (SD3 / FLUX: export --max-sequence-length); a call's
    # max_sequence_length defaults to it and may not exceed it. None: the family has no T5 stream
    max_sequence_length: int | None = None
    format_version: int = FORMAT_VERSION
    defaults: GenerationDefaults = GenerationDefaults()  # recommended steps / guidance (none: the runtime's)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise BundleError(f"family {self.family!r}; expected one of {list(FAMILIES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise BundleError(f"prediction_type {self.prediction_type!r}; expected one of {list(PREDICTION_TYPES)}")
        for name, comp in self.components.items():
            if not is_component(name):
                raise BundleError(f"component {name!r}; expected one of {list(COMPONENTS)}")
            if comp.optimized_for not in OPTIMIZED_FOR:
                raise BundleError(f"component {name!r}: optimized_for {comp.optimized_for!r}; expected one of "
                                  f"{list(OPTIMIZED_FOR)}")
            if comp.precision not in PRECISIONS:
                raise BundleError(f"component {name!r}: precision {comp.precision!r}; expected one of {list(PRECISIONS)}")

    def all_files(self) -> tuple[FileEntry, ...]:
        out = list(self.files)
        for comp in self.components.values():
            out.extend(comp.files)
        return tuple(out)

    # -- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Build a manifest from parsed JSON after checking it against the schema (schema.py): a wrong type or
        range is one BundleError naming the field, never a TypeError or a ZeroDivisionError later."""
        version = data.get("format_version", None) if isinstance(data, dict) else None
        if type(version) is not int or version != FORMAT_VERSION:
            shown = version if isinstance(version, (int, float, str, type(None))) else type(version).__name__
            raise BundleError(
                f"manifest format_version {shown!r} is not supported by this edgediff (reads {FORMAT_VERSION}); "
                "upgrade edgediff or re-export the bundle"
            )
        check_manifest(data)
        return cls(
            family=data["family"],
            prediction_type=data["prediction_type"],
            default_height=data["default_height"],
            default_width=data["default_width"],
            latent_channels=data["latent_channels"],
            vae_scale_factor=data["vae_scale_factor"],
            scaling_factor=float(data["scaling_factor"]),
            text_max_length=data["text_max_length"],
            components={name: _component(c) for name, c in data["components"].items()},
            files=tuple(_file(f) for f in data["files"]),
            provenance=_provenance(data["provenance"]),
            shift_factor=None if data.get("shift_factor") is None else float(data["shift_factor"]),
            max_sequence_length=data.get("max_sequence_length"),
            format_version=version,
            defaults=_defaults(data.get("defaults") or {}),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Parse edgediff.json (text, or the file's bytes, which must be UTF-8)."""
        if len(text) > MAX_MANIFEST_BYTES:
            raise BundleError(f"manifest is {len(text)} bytes; a manifest is a few KB (limit {MAX_MANIFEST_BYTES})")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BundleError(f"manifest is not UTF-8 text (byte {exc.start}: {exc.reason}); re-export or "
                                  "re-copy the bundle") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"manifest is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except RecursionError:  # the C parser's guard against e.g. 100 000 nested lists
            raise BundleError("manifest is nested too deeply to be a manifest (a list or object inside itself "
                              "thousands of times)") from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise BundleError(f"manifest holds a value JSON cannot represent here: {str(exc)[:100]}") from None
        if not isinstance(data, dict):
            raise BundleError("manifest must be a JSON object")
        return cls.from_dict(data)


def _defaults(d: Mapping[str, Any]) -> GenerationDefaults:
    g = d.get("guidance_scale")
    return GenerationDefaults(steps=d.get("steps"), guidance_scale=None if g is None else float(g))


def _provenance(d: Mapping[str, Any]) -> Provenance:
    known = {f.name for f in dataclasses.fields(Provenance)}
    kw = {k: v for k, v in d.items() if k in known}  # unknown keys warned about by the schema
    return Provenance(**{**kw, "libraries": dict(kw.get("libraries", {})), "transforms": tuple(kw.get("transforms", ()))})


def _file(d: Mapping[str, Any]) -> FileEntry:
    return FileEntry(path=d["path"], size=d["size"], sha256=d["sha256"])


def _spec(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def _receipt(d: Mapping[str, Any]) -> ParityReceipt:
    rel_l2 = d.get("rel_l2")
    return ParityReceipt(reference=d["reference"], max_abs=float(d["max_abs"]), max_rel=float(d["max_rel"]),
                         tolerance=float(d["tolerance"]), inputs={k: list(v) for k, v in d.get("inputs", {}).items()},
                         metric=d.get("metric", "max_rel"), rel_l2=None if rel_l2 is None else float(rel_l2))


def _component(d: Mapping[str, Any]) -> Component:
    parity = d.get("parity")
    return Component(
        name=d["name"],
        model=d["model"],
        files=tuple(_file(f) for f in d["files"]),
        inputs=tuple(_spec(s) for s in d["inputs"]),
        outputs=tuple(_spec(s) for s in d["outputs"]),
        precision=d.get("precision", "fp32"),
        parity=None if parity is None else _receipt(parity),
        optimized_for=d.get("optimized_for", ""),
    )


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, and the receipts' derived ``passed`` flag for readers of the JSON."""
    if isinstance(obj, dict):
        out = {k: _plain(v) for k, v in obj.items()}
        if {"max_rel", "tolerance"} <= out.keys():
            value = out["max_rel"] if out.get("metric", "max_rel") == "max_rel" else out.get("rel_l2")
            out["passed"] = value is not None and value <= out["tolerance"]
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
