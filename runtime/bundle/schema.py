"""The manifest's schema: every field's type and range, checked on the parsed JSON before any dataclass is built.

A manifest is read by code that divides by its numbers, allocates arrays of its sizes and opens the paths it
names, so a wrong type or range must stop at the door with one line naming the field and what is allowed
(``components.unet.inputs[0].shape[1]: -4; expected an integer from 1 to 2147483647 or a dim name``), never as a
ZeroDivisionError or TypeError deep in a run. Hand-written, not jsonschema: the runtime has no dependency for it.
bool is refused where a number is expected (it is an int to Python), and so are NaN and infinities.

Unknown keys warn and are ignored (a newer edgediff may add fields; what this one reads still applies).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping

from ..errors import BundleError

# Bounds: generous for every model family edgediff knows or reserves, tight enough that arithmetic on them stays
# cheap and finite (a 10**12-pixel default size would be accepted by a check for "positive int" and then hang).
MAX_SIDE = 16384
MAX_DIM = 2**31 - 1
MAX_RANK = 8
MAX_TEXT_LENGTH = 1 << 16
MAX_FILE_SIZE = 1 << 50
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")

# Allowed values (re-exported by manifest.py, where the dataclasses that hold them live).
# Model families. Only the first three run today; the rest are reserved so that their bundles need no format change.
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-turbo", "sd-turbo", "lcm", "sd3", "flux")
PRECISIONS = ("fp32", "fp16", "mixed-fp16", "int8-qdq", "fp8-qdq", "int8-weights", "int4-weights",
              "int8-storage")
OPTIMIZED_FOR = ("", "cpu", "cuda")  # "" = portable graph (see Component.optimized_for)
# components (name prefixes) whose graphs saved by `edgediff optimize` re-run ONNX Runtime's level "all" at load by
# default, for the CPU's NCHWc convolution layout: SDXL's VAE decoder at 512x512 took 0.15 -> 0.32 s to create and
# 23.4 -> 19.0 s to run (the exported graph: 20.4 s; `edgediff bench session-levels`, docs/engines.md). The tiny
# autoencoders are convolutions too. Denoisers and text encoders open as saved (cold start; OrtOptions).
REOPTIMIZE_AT_LOAD = ("vae_decoder", "vae_encoder")
# DeepCache (runtime/deepcache.py): the UNet that also outputs the cached features, and one shallow UNet per skip
# branch id (DeepCache's cache_branch_id = 3 x block + layer; 4 down blocks x 3 layers for SD 1.x/2.x).
DEEPCACHE_FULL = "unet_deepcache_full"
DEEPCACHE_MAX_BRANCHES = 12


def deepcache_shallow(branch: int) -> str:
    return f"unet_deepcache_shallow_{branch}"


DEEPCACHE_COMPONENTS = (DEEPCACHE_FULL, *(deepcache_shallow(b) for b in range(DEEPCACHE_MAX_BRANCHES)))
# Component names follow optimum's ONNX Stable Diffusion layout (one folder each).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder",
              "vae_decoder_tiny", "vae_encoder_tiny",  # the tiny autoencoder (export --tiny-vae; TAESD)
              "transformer", "text_encoder_3",  # SD3 / FLUX: the diffusion transformer (MMDiT) and the T5 encoder
              *DEEPCACHE_COMPONENTS)  # DeepCache's full UNet + shallow graphs (export --deepcache; runtime/deepcache.py)
# ControlNet (export --controlnet; runtime/controlnet.py): the UNet that also takes the residuals, and one
# component per ControlNet, named "controlnet_<name>" (a name of a-z, 0-9, "_", "-")
RESIDUAL_UNET = "unet_controlnet"
CONTROLNET_PREFIX = "controlnet_"
_CONTROLNET = re.compile(r"controlnet_[a-z0-9][a-z0-9_-]{0,47}")
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool", "uint8", "int8")

REQUIRED = ("format_version", "family", "prediction_type", "default_height", "default_width", "latent_channels",
            "vae_scale_factor", "scaling_factor", "text_max_length", "components", "files", "provenance")
OPTIONAL = ("shift_factor", "defaults", "max_sequence_length")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # flow: the velocity of rectified flow (SD3, FLUX)
METRICS = ("max_rel", "rel_l2")


def check_manifest(data: Any) -> None:
    """Raise BundleError naming the first field of ``data`` (parsed edgediff.json) that is not allowed."""
    d = _object(data, "manifest")
    _keys(d, "manifest", REQUIRED, OPTIONAL)
    _choice(d["family"], "family", FAMILIES)
    _choice(d["prediction_type"], "prediction_type", PREDICTION_TYPES)
    f = d["vae_scale_factor"]
    if type(f) is not int or not 1 <= f <= 64 or f & (f - 1):  # image sides are divided by it
        raise BundleError(f"vae_scale_factor {_show(f)}; expected a power of two from 1 to 64 (2 ** (VAE levels - 1))")
    for key in ("default_height", "default_width"):
        side = _int(d[key], key, 1, MAX_SIDE)
        if side % f:
            raise BundleError(f"{key} {side} is not a multiple of vae_scale_factor {f}")
    _int(d["latent_channels"], "latent_channels", 1, 256)
    _number(d["scaling_factor"], "scaling_factor", low=0.0, high=1e6, open_low=True)
    if d.get("shift_factor") is not None:
        _number(d["shift_factor"], "shift_factor", low=-1e6, high=1e6)
    _int(d["text_max_length"], "text_max_length", 3, MAX_TEXT_LENGTH)
    if d.get("max_sequence_length") is not None:  # T5's token length (SD3 / FLUX)
        _int(d["max_sequence_length"], "max_sequence_length", 1, MAX_TEXT_LENGTH)
    if d.get("defaults") is not None:
        _defaults(_object(d["defaults"], "defaults"))

    seen: set[str] = set()
    comps = _object(d["components"], "components")
    for name, comp in comps.items():
        if not is_component(name):
            _choice(name, "components key", COMPONENTS)
        _component(comp, f"components.{name}", name, seen)
    for i, entry in enumerate(_list(d["files"], "files")):
        _file(entry, f"files[{i}]", seen)
    _provenance(_object(d["provenance"], "provenance"))


def is_component(name: Any) -> bool:
    """A component name a manifest may list: one of COMPONENTS, the residual UNet, or ``controlnet_<name>``."""
    return name in COMPONENTS or name == RESIDUAL_UNET or (isinstance(name, str) and bool(_CONTROLNET.fullmatch(name)))


# -- parts ---------------------------------------------------------------------------------------------------
def _defaults(d: Mapping[str, Any]) -> None:
    _keys(d, "defaults", (), ("steps", "guidance_scale"))
    if d.get("steps") is not None:
        _int(d["steps"], "defaults.steps", 1, 1000)
    if d.get("guidance_scale") is not None:
        _number(d["guidance_scale"], "defaults.guidance_scale", low=0.0, high=1e6, open_high=True)


def _component(value: Any, where: str, key: str, seen: set[str]) -> None:
    c = _object(value, where)
    _keys(c, where, ("name", "model", "files", "inputs", "outputs"), ("precision", "parity", "optimized_for"))
    if c["name"] != key:
        raise BundleError(f"{where}.name {_show(c['name'])}; expected {key!r}, the key it is listed under")
    model = _path(c["model"], f"{where}.model")
    files = _list(c["files"], f"{where}.files", low=1)
    for i, entry in enumerate(files):
        _file(entry, f"{where}.files[{i}]", seen)
    if files[0]["path"] != model:
        # the graph the runtime opens must be the file that is pinned first, or it would be opened unchecked
        raise BundleError(f"{where}.model {model!r} is not its first pinned file ({files[0]['path']!r}); "
                          "the graph must be pinned by its own files entry")
    for io in ("inputs", "outputs"):
        names: set[str] = set()
        for i, spec in enumerate(_list(c[io], f"{where}.{io}", low=1)):
            name = _tensor(spec, f"{where}.{io}[{i}]")
            if name in names:
                raise BundleError(f"{where}.{io}: tensor {name!r} is listed twice")
            names.add(name)
    if "precision" in c:
        _choice(c["precision"], f"{where}.precision", PRECISIONS)
    if "optimized_for" in c:
        _choice(c["optimized_for"], f"{where}.optimized_for", OPTIMIZED_FOR)
    if c.get("parity") is not None:
        _receipt(_object(c["parity"], f"{where}.parity"), f"{where}.parity")


def _receipt(r: Mapping[str, Any], where: str) -> None:
    _keys(r, where, ("reference", "max_abs", "max_rel", "tolerance"), ("inputs", "metric", "rel_l2", "passed"))
    _string(r["reference"], f"{where}.reference")
    _number(r["max_abs"], f"{where}.max_abs", low=0.0)
    _number(r["max_rel"], f"{where}.max_rel", low=0.0)
    _number(r["tolerance"], f"{where}.tolerance", low=0.0, open_low=True)
    metric = r.get("metric", "max_rel")
    _choice(metric, f"{where}.metric", METRICS)
    if r.get("rel_l2") is not None:
        _number(r["rel_l2"], f"{where}.rel_l2", low=0.0)
    elif metric == "rel_l2":
        raise BundleError(f"{where}.rel_l2 is missing; a receipt whose metric is 'rel_l2' must record it")
    if "passed" in r and not isinstance(r["passed"], bool):  # derived on write and ignored on read
        raise BundleError(f"{where}.passed {_show(r['passed'])}; expected true or false")
    for name, shape in _object(r.get("inputs", {}), f"{where}.inputs").items():
        for j, n in enumerate(_list(shape, f"{where}.inputs.{name}", high=MAX_RANK)):
            _int(n, f"{where}.inputs.{name}[{j}]", 1, MAX_DIM)


def _tensor(value: Any, where: str) -> str:
    t = _object(value, where)
    _keys(t, where, ("name", "dtype", "shape"), ())
    name = _string(t["name"], f"{where}.name", low=1)
    _choice(t["dtype"], f"{where}.dtype", DTYPES)
    for j, dim in enumerate(_list(t["shape"], f"{where}.shape", high=MAX_RANK)):
        ok = (type(dim) is int and 1 <= dim <= MAX_DIM) or (isinstance(dim, str) and _DIM_NAME.fullmatch(dim))
        if not ok:
            raise BundleError(f"{where}.shape[{j}] {_show(dim)}; expected an integer from 1 to {MAX_DIM} or a dim "
                              "name such as 'batch'")
    return name


def _file(value: Any, where: str, seen: set[str]) -> None:
    e = _object(value, where)
    _keys(e, where, ("path", "size", "sha256"), ())
    path = _path(e["path"], f"{where}.path")
    if path in seen:
        raise BundleError(f"{where}.path {path!r} is pinned twice; each file has one entry")
    seen.add(path)
    _int(e["size"], f"{where}.size", 0, MAX_FILE_SIZE)
    if not (isinstance(e["sha256"], str) and _SHA256.fullmatch(e["sha256"])):
        raise BundleError(f"{where}.sha256 {_show(e['sha256'])}; expected 64 lowercase hex digits")


def _provenance(p: Mapping[str, Any]) -> None:
    _keys(p, "provenance", ("exporter",), ("libraries", "source", "source_class", "parent", "transforms"))
    _string(p["exporter"], "provenance.exporter")
    for key in ("source", "source_class"):
        if key in p:
            _string(p[key], f"provenance.{key}")
    if "parent" in p and not (p["parent"] == "" or (isinstance(p["parent"], str) and _SHA256.fullmatch(p["parent"]))):
        raise BundleError(f"provenance.parent {_show(p['parent'])}; expected '' or the parent manifest's sha256 "
                          "(64 lowercase hex digits)")
    for name, version in _object(p.get("libraries", {}), "provenance.libraries").items():
        _string(version, f"provenance.libraries.{name}")
    for i, step in enumerate(_list(p.get("transforms", []), "provenance.transforms")):
        _string(step, f"provenance.transforms[{i}]")


# -- primitives ----------------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A short, always printable view of a value: containers by kind only (they may be nested 100 000 deep)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return "a huge integer"
    return repr(value)


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BundleError(f"{where} is {_show(value)}; expected a JSON object")
    return value


def _list(value: Any, where: str, *, low: int = 0, high: int = 1 << 20) -> list:
    if not isinstance(value, list):
        raise BundleError(f"{where} is {_show(value)}; expected a JSON list")
    if not low <= len(value) <= high:
        raise BundleError(f"{where} has {len(value)} entries; expected {low} to {high}")
    return value


def _keys(d: Mapping[str, Any], where: str, required, optional) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise BundleError(f"{where}: required key {missing[0]!r} is missing")
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        shown = [k if len(k) <= 40 else k[:40] + "..." for k in unknown[:5]]
        warnings.warn(f"edgediff.json {where}: ignoring unknown keys {shown}; this edgediff reads "
                      f"{sorted([*required, *optional])}", stacklevel=4)


def _int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # type(): bool is an int subclass, and is refused
        raise BundleError(f"{where} {_show(value)}; expected an integer from {low} to {high}")
    return value


def _number(value: Any, where: str, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False,
            open_high: bool = False) -> float:
    # an int too large for a float (10**400) is refused here: math.isfinite would raise OverflowError on it
    ok = (type(value) is float and math.isfinite(value)) or (type(value) is int and abs(value) <= 2**53)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        lo = f"> {low:g}" if open_low else f">= {low:g}"
        hi = "" if high == math.inf else (f" and < {high:g}" if open_high else f" and <= {high:g}")
        raise BundleError(f"{where} {_show(value)}; expected a finite number {lo}{hi}")
    return float(value)


def _string(value: Any, where: str, *, low: int = 0, high: int = 4096) -> str:
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise BundleError(f"{where} {_show(value)}; expected a string of {low} to {high} characters")
    return value


def _path(value: Any, where: str) -> str:
    """A bundle-relative POSIX path; containment is checked against the disk by safety.resolve_inside."""
    path = _string(value, where, low=1, high=1024)
    if any(ord(ch) < 32 or ch == "\x7f" for ch in path) or any(0xD800 <= ord(ch) <= 0xDFFF for ch in path):
        raise BundleError(f"{where} {_show(path)}; expected a printable path relative to the bundle")
    return path


def _choice(value: Any, where: str, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise BundleError(f"{where} {_show(value)}; expected one of {list(allowed)}")
