"""Seeded mutations of a real manifest (the built-in model's edgediff.json): whatever a damaged or hostile manifest
holds, opening and verifying the bundle (and, for some, loading it and generating one step) either works or
raises an EdgediffError — never another exception type, which the CLI would print as "internal error" (exit 70).

Each mutation applies one to three edits: a value of another type, a dropped or added key, extreme numbers
(NaN, infinities, 10**5000), deep nesting, invalid UTF-8 bytes, a list and an object swapped, hostile paths and
hashes, truncation. Seeded, so a failure names the seed that reproduces it.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from pathlib import Path

import pytest

from edgediff.builtin_model import default_bundle
from edgediff.bundle.manifest import MANIFEST_NAME
from edgediff.bundle.reader import Bundle
from edgediff.errors import EdgediffError

SEEDS = range(300)
GENERATE_EVERY = 3  # Pipeline.load + one step for every 3rd mutation that opens (bounded: a few seconds)
DEEP = "\u0000deep\u0000"  # placeholder replaced by nesting after json.dumps, which cannot write 100 000 levels

ODD_VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 1.5, -0.0, 1e308, float("nan"), float("inf"),
              float("-inf"), "", "x", "big", "../../etc/passwd", "/etc/passwd", "unet/model.onnx", "A" * 64,
              "0" * 64, "\udcff", "a\u0000b", "é" * 300, [], {}, [1, 2], [[]], {"a": 1}, ["batch", -4]]

PLAUSIBLE_STRINGS = ["sd1", "sd2", "sd2-v", "sdxl", "epsilon", "v_prediction", "sample", "float16", "int64", "float32",
                     "fp16", "int8-qdq", "cpu", "cuda", "", "batch", "height", "width", "sequence", "max_rel", "rel_l2",
                     "unet", "text_encoder", "vae_decoder/model.onnx", "unet/model.onnx", "model_index.json"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """One copy of the built-in bundle per module: mutations rewrite only its manifest."""
    dst = tmp_path_factory.mktemp("fuzz") / "shapes"
    shutil.copytree(default_bundle(), dst)
    return dst


def _paths(node, prefix=()):
    """Every (path, value) in the JSON tree, parents before children."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(root, path, value):
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _mutate(rng: random.Random, data: dict) -> tuple[bytes, list[str]]:
    """Apply 1-3 edits to ``data`` (in place) and return the manifest's bytes and what was done."""
    done: list[str] = []
    deep = 0
    byte_edits = []
    for _ in range(rng.randint(1, 3)):
        nodes = [(p, v) for p, v in _paths(data) if p]
        path, value = rng.choice(nodes)
        op = rng.choice(["type", "drop", "add", "extreme", "deep", "swap", "bytes", "move", "hostile",
                         "plausible", "plausible", "plausible", "plausible"])
        if op == "plausible":  # a value of the right type and range, but not this model's: passes the schema
            scalars = [(p, v) for p, v in _paths(data) if isinstance(v, (int, float, str)) or v is None]
            spath, v = rng.choice(scalars)
            if isinstance(v, bool) or v is None:
                new = rng.choice([True, False, None, 0.5])
            elif isinstance(v, int):
                new = rng.choice([1, 2, 3, 4, 8, 16, 24, 32, 64, 77, 128, 256])
            elif isinstance(v, float):
                new = rng.choice([1e-6, 0.5, 1.0, 2.0, 1000.0])
            else:
                new = rng.choice(PLAUSIBLE_STRINGS)
            _set(data, spath, new)
            done.append(f"{spath}={new!r}"[:120])
        elif op == "type":
            new = rng.choice(ODD_VALUES)
            _set(data, path, new)
            done.append(f"{path}={new!r}"[:120])
        elif op == "drop":
            parents = [(p, v) for p, v in _paths(data) if isinstance(v, (dict, list)) and v]
            ppath, parent = rng.choice(parents)
            key = rng.choice(list(parent)) if isinstance(parent, dict) else rng.randrange(len(parent))
            del parent[key]
            done.append(f"drop {(*ppath, key)}")
        elif op == "add":
            dicts = [(p, v) for p, v in _paths(data) if isinstance(v, dict)]
            ppath, parent = rng.choice(dicts)
            key = rng.choice(["extra", "passed", "name", "__proto__", "format_version", "shape", "\udcff", "k" * 200])
            parent[key] = rng.choice(ODD_VALUES)
            done.append(f"add {(*ppath, key)}")
        elif op == "extreme":
            numbers = [(p, v) for p, v in _paths(data) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            npath, _ = rng.choice(numbers)
            new = rng.choice([0, -1, 2**53 + 1, -(2**63), 10**400, 1e-320, 5e-324, float("nan"), float("inf"),
                              -1e308, 65536, 16384, 16385, 1 << 40])
            _set(data, npath, new)
            done.append(f"{npath}={new!r}"[:120])
        elif op == "deep":
            deep = rng.choice([50, 900, 5000, 100_000])
            _set(data, path, DEEP)
            done.append(f"{path}=nested {deep}")
        elif op == "swap":
            containers = [(p, v) for p, v in _paths(data) if p and isinstance(v, (dict, list))]
            cpath, c = rng.choice(containers)
            new = list(c.values()) if isinstance(c, dict) else {str(i): v for i, v in enumerate(c)}
            _set(data, cpath, new)
            done.append(f"swap {cpath}")
        elif op == "move":
            other_path, other = rng.choice(nodes)
            if path[: len(other_path)] != other_path and other_path[: len(path)] != path:
                _set(data, path, json.loads(json.dumps(other)))
                done.append(f"{path}<-{other_path}")
        elif op == "hostile":
            strings = [(p, v) for p, v in _paths(data) if isinstance(v, str)]
            spath, s = rng.choice(strings)
            new = rng.choice(["../" * 8 + "etc/passwd", "/dev/zero", "unet", "unet/", ".", "", s.upper(), s + "\n",
                              s[:-1], "x/" * 300 + "y", "C:\\x", "unet\\..\\..\\x", "edgediff.json", "model_index.json"])
            _set(data, spath, new)
            done.append(f"{spath}={new!r}"[:120])
        elif op == "bytes":
            byte_edits.append(rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\x80\x80", b"\"", b"{"]))
            done.append(f"bytes {byte_edits[-1]!r}")
    text = json.dumps(data, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
    if deep:
        text = text.replace(json.dumps(DEEP), "[" * deep + "]" * deep, 1)
    raw = text.encode("utf-8", "surrogatepass")
    for junk in byte_edits:
        at = rng.randrange(len(raw))
        raw = raw[:at] + junk + raw[at + rng.choice([0, 1]):]
    if rng.random() < 0.03:
        raw = raw[: rng.randrange(len(raw))]
        done.append("truncated")
    return raw, done


def test_manifest_mutations_raise_only_edgediff_errors(bundle):
    from edgediff.pipeline import Pipeline

    original = (bundle / MANIFEST_NAME).read_bytes()
    base = json.loads(original)
    failures, opened, generated = [], 0, 0
    for seed in SEEDS:
        rng = random.Random(seed)
        raw, done = _mutate(rng, json.loads(json.dumps(base)))
        (bundle / MANIFEST_NAME).write_bytes(raw)
        stage = "open"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown keys warn; that is allowed
                b = Bundle.open(bundle)
                opened += 1
                stage = "verify"
                b.verify()
                m = b.manifest
                small = max(m.default_height, m.default_width) <= 256 and m.text_max_length <= 1024
                if small and opened % GENERATE_EVERY == 0:
                    stage = "generate"
                    with Pipeline.load(bundle) as pipe:
                        pipe("a small red circle", num_inference_steps=1, seed=0, output_type="np")
                    generated += 1
        except EdgediffError as exc:
            assert "\n" not in str(exc).strip(), f"seed {seed} ({done}): a multi-line message: {exc}"
        except Exception as exc:  # noqa: BLE001 - the point of the test
            failures.append(f"seed {seed} at {stage} ({'; '.join(done)}): {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            (bundle / MANIFEST_NAME).write_bytes(original)
    assert not failures, f"{len(failures)} mutation(s) raised a non-edgediff error:\n" + "\n".join(failures[:15])
    # the mutations are not all refused at the door: some open, verify and run, so those paths are exercised too
    print(f"{opened} of {len(SEEDS)} mutations opened, {generated} generated")
    assert opened >= 20 and generated >= 2, (opened, generated)


def test_the_unmutated_manifest_opens_verifies_and_runs(bundle):
    """The fuzz baseline: the copy itself is a good bundle (so refusals above come from the mutations)."""
    assert Bundle.open(bundle).verify() == []
    assert not math.isnan(Bundle.open(bundle).manifest.scaling_factor)
