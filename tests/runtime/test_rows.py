"""runtime/rows.py: a graph run a few batch rows at a time gives the arrays of one whole call."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgediff import Pipeline
from edgediff.bundle.manifest import TensorSpec
from edgediff.rows import run_in_rows


@dataclass
class RowGraph:
    """y = x * scale + t per row (t: (batch,)); ``bias`` is not batched; ``table`` is an output without a batch."""
    batch: object = "batch"
    component: str = "unet"

    def __post_init__(self):
        b = self.batch
        self.inputs = (TensorSpec("x", "float32", (b, 3)), TensorSpec("t", "float32", (b,)),
                       TensorSpec("bias", "float32", (3,)))
        self.outputs = (TensorSpec("y", "float32", (b, 3)), TensorSpec("table", "float32", (2,)))
        self.calls: list[int] = []

    def run(self, feeds):
        self.calls.append(feeds["x"].shape[0])
        return [feeds["x"] * 2 + feeds["t"][:, None] + feeds["bias"], np.array([1.0, 2.0], np.float32)]


def feeds(rows):
    r = np.random.default_rng(0)
    return {"x": r.standard_normal((rows, 3), dtype=np.float32), "t": np.arange(rows, dtype=np.float32),
            "bias": np.ones(3, np.float32)}


def test_rows_are_run_in_slices_and_concatenated():
    g, f = RowGraph(), feeds(5)
    whole = g.run(f)
    g.calls.clear()
    out = run_in_rows(g.run, g, f, 2)
    assert g.calls == [2, 2, 1]
    np.testing.assert_array_equal(out[0], whole[0])
    np.testing.assert_array_equal(out[1], whole[1])


def test_whole_call_when_it_fits_or_no_limit_or_the_batch_is_fixed():
    for graph, rows, limit in ((RowGraph(), 2, 2), (RowGraph(), 4, None), (RowGraph(batch=4), 4, 1)):
        out = run_in_rows(graph.run, graph, feeds(rows), limit)
        assert graph.calls == [rows] and out[0].shape == (rows, 3)


def test_low_memory_runs_the_guided_unet_one_row_at_a_time(tiny_sd1_bundle):
    """Classifier-free guidance's two halves go through the UNet in turn, and the image is the default mode's."""
    seen: list[int] = []

    def watch(name, backend):
        run = backend.run

        def recorded(f):
            if name == "unet":
                seen.append(f["sample"].shape[0])
            return run(f)
        backend.run = recorded
        return backend

    kw = dict(prompt="a dog", num_inference_steps=2, guidance_scale=7.5, seed=5, output_type="np", scheduler="euler")
    with Pipeline.load(tiny_sd1_bundle, low_memory=True) as low, Pipeline.load(tiny_sd1_bundle) as full:
        low.components.wrap(watch)
        a = low(**kw).images[0]
        b = full(**kw).images[0]
    assert seen == [1, 1, 1, 1]
    # rows alone give the rows of a whole batch (runtime/batching.py's test shows it to the bit); the rest is
    # low-memory mode's unpacked weights: MLAS sums in another order, ~1e-6 apart
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_low_memory_mode_opens_graphs_without_prepacked_weights(tiny_sd1_bundle):
    from edgediff.backends.ort import OrtOptions

    with Pipeline.load(tiny_sd1_bundle, low_memory=True) as low:
        assert low.components.options.disable_prepacking is True
        assert low.components.options.shrink_arena_after_run is True
    with Pipeline.load(tiny_sd1_bundle, low_memory=True, options=OrtOptions(disable_prepacking=False)) as asked:
        assert asked.components.options.disable_prepacking is False  # the caller's explicit choice stands
    with Pipeline.load(tiny_sd1_bundle) as default:
        options = default.components.options or OrtOptions()
        assert not options.disable_prepacking and not options.shrink_arena_after_run


def test_arena_shrinkage_gives_the_arena_back_after_a_run(tiny_sd1_bundle):
    """With shrinkage on, a run's activations are not held by the arena afterwards; the outputs are the same."""
    from edgediff.backends import open_backend
    from edgediff.backends.ort import OrtOptions
    from edgediff.bundle.reader import Bundle

    b = Bundle.open(tiny_sd1_bundle)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    outs = []
    for shrink in (False, True):
        opts = OrtOptions(shared_arena=False, shrink_arena_after_run=shrink)
        backend = open_backend("cpu", b, b.component("vae_decoder"), b.model_path("vae_decoder"), opts)
        assert (backend._run_options is not None) == shrink
        outs.append(backend.run({"latent_sample": x}))
        backend.close()
    np.testing.assert_array_equal(outs[0][backend.outputs[0].name], outs[1][backend.outputs[0].name])
