"""The engine cache (edgediff.backends.tensorrt.cache, in the core since the runtime loads what the builder stores)
without a GPU: key composition, atomic write + meta commit marker, the lock, the rebuild hint, and refusal of plans
that are missing, truncated, altered, or built for another GPU/TensorRT."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edgediff.backends.tensorrt.cache import EngineCache, EngineKey, EngineNotBuilt, graph_digest, rebuild_command
from edgediff.errors import EngineIncompatible

REBUILD = "edgediff build B --force"


def key(**kw) -> EngineKey:
    base = dict(component="unet", onnx_sha256="a" * 64, tensorrt="10.3.0", gpu="Orin", compute_capability="8.7",
                profile={"images": [1, 1, 4], "height": [256, 512, 768], "width": [256, 512, 768], "cfg": True},
                flags={"opt_level": 3, "workspace_gb": None, "refit": False, "version_compatible": False})
    return EngineKey(**{**base, **kw})


@pytest.mark.parametrize("change", [
    dict(onnx_sha256="b" * 64), dict(tensorrt="10.7.0"), dict(gpu="NVIDIA A100"), dict(compute_capability="8.0"),
    dict(profile={"images": [1, 1, 1]}), dict(flags={"opt_level": 5}), dict(component="vae_decoder"),
])
def test_everything_that_invalidates_an_engine_changes_the_key(change):
    assert key().digest != key(**change).digest and key().stem != key(**change).stem
    assert key().digest == key().digest  # and nothing else does


def test_store_then_load_round_trip(tmp_path):
    cache = EngineCache(tmp_path)
    plan = bytes(range(256)) * 100
    path = cache.store(key(), plan, build_seconds=1.5)
    assert path.read_bytes() == plan and cache.load(key(), REBUILD) == plan
    meta = json.loads(cache.meta_path(key()).read_text())
    assert meta["plan_bytes"] == len(plan) and meta["key"]["gpu"] == "Orin" and meta["build_seconds"] == 1.5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_missing_engine_says_how_to_build(tmp_path):
    with pytest.raises(EngineNotBuilt, match="build it: edgediff build B --force"):
        EngineCache(tmp_path).load(key(), REBUILD)


def test_rebuild_hint_names_the_bundle_and_a_custom_engine_dir(tmp_path):
    assert rebuild_command(tmp_path / "b", None) == f"edgediff build {tmp_path / 'b'} --force"
    assert rebuild_command("b", tmp_path) == f"edgediff build b --engine-dir {tmp_path} --force"


def test_select_with_nothing_built_says_build_without_force(tmp_path):
    cache = EngineCache(tmp_path / "none")
    with pytest.raises(EngineNotBuilt, match=r"unet: no TensorRT engine in .* for this bundle; build it: "
                                             r"edgediff build B$"):
        cache.select("unet", "a" * 64, "10.3.0", "Orin", "8.7", REBUILD)
    assert not (tmp_path / "none").exists()  # looking never creates the cache folder


def test_unreadable_or_foreign_meta_is_refused(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), b"plan")
    cache.meta_path(key()).write_text("{not json")
    with pytest.raises(EngineIncompatible, match="is unreadable; rebuild it"):
        cache.load(key(), REBUILD)
    cache.meta_path(key()).write_text(json.dumps({"meta_version": 99}))
    with pytest.raises(EngineIncompatible, match="written by another edgediff version"):
        cache.load(key(), REBUILD)
    assert cache.entries()[0]["meta_version"] == 99


def test_meta_records_the_edgediff_that_built_it(tmp_path):
    from edgediff import __version__

    cache = EngineCache(tmp_path)
    cache.store(key(), b"plan")
    assert json.loads(cache.meta_path(key()).read_text())["built_by"] == f"edgediff {__version__}"


def test_truncated_and_altered_plans_are_refused(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(), b"x" * 1000)
    cache.plan_path(key()).write_bytes(b"x" * 999)
    with pytest.raises(EngineIncompatible, match="999 bytes, its meta says 1000 .* rebuild it"):
        cache.load(key(), REBUILD)
    cache.plan_path(key()).write_bytes(b"y" * 1000)
    with pytest.raises(EngineIncompatible, match="does not match the sha256"):
        cache.load(key(), REBUILD)


def test_engine_for_another_gpu_or_tensorrt_is_named(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(gpu="NVIDIA A100", compute_capability="8.0"), b"plan")
    with pytest.raises(EngineIncompatible, match="built for GPU 'NVIDIA A100'; this machine has 'Orin'"):
        cache.load(key(), REBUILD)
    with pytest.raises(EngineIncompatible, match="built for GPU 'NVIDIA A100'; this machine has 'Orin'"):
        cache.select("unet", "a" * 64, "10.3.0", "Orin", "8.7", REBUILD)
    other = EngineCache(tmp_path / "other")
    other.store(key(tensorrt="10.7.0"), b"plan")
    with pytest.raises(EngineIncompatible, match="built for TensorRT '10.7.0'; this machine has '10.3.0'"):
        other.select("unet", "a" * 64, "10.3.0", "Orin", "8.7", REBUILD)


def test_select_picks_a_compatible_engine_and_tampered_meta_is_refused(tmp_path):
    cache = EngineCache(tmp_path)
    cache.store(key(gpu="Other"), b"other")
    cache.store(key(), b"mine")
    assert cache.select("unet", "a" * 64, "10.3.0", "Orin", "8.7", REBUILD) == b"mine"
    meta = json.loads(cache.meta_path(key()).read_text())
    meta["key"]["tensorrt"] = "9.9"
    cache.meta_path(key()).write_text(json.dumps(meta))
    with pytest.raises(EngineIncompatible, match="does not describe this engine"):
        cache.load(key(), REBUILD)


def test_writer_killed_mid_write_leaves_nothing_loadable(tmp_path):
    """A builder killed while writing its plan (before the meta, the commit marker) leaves no engine; the next
    builder stores one cleanly."""
    code = textwrap.dedent(f"""
        import os, sys, time
        from edgediff.backends.tensorrt import cache as c
        def slow_write(path, data):
            tmp = path.with_name("." + path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush()
                print("half", flush=True); time.sleep(60)
        c.write_durably = slow_write
        from tests_key import key
        c.EngineCache({str(tmp_path)!r}).store(key(), b"z" * 100000)
    """)
    (tmp_path / "tests_key.py").write_text("from edgediff.backends.tensorrt.cache import EngineKey\n"
                                           f"def key():\n    return EngineKey(**{key().to_dict()!r})\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert p.stdout.readline().strip() == "half"
    p.kill()
    p.wait()
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineNotBuilt):
        cache.load(key(), REBUILD)
    cache.store(key(), b"z" * 100000)
    assert cache.load(key(), REBUILD) == b"z" * 100000


def test_lock_serializes_builders(tmp_path):
    cache = EngineCache(tmp_path)
    order = []

    def builder(name):
        with cache.lock("unet"):
            order.append(f"{name} in")
            time.sleep(0.2)
            order.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[0].endswith("in") and order[1] == order[0].replace("in", "out")


def test_graph_digest_covers_external_data(tiny_sd1_bundle):
    import dataclasses

    from edgediff.bundle.reader import Bundle

    comp = Bundle.open(tiny_sd1_bundle).component("unet")
    extra = dataclasses.replace(comp.files[0], path="unet/model.onnx_data", sha256="f" * 64)
    assert graph_digest(comp) != graph_digest(dataclasses.replace(comp, files=(*comp.files, extra)))
