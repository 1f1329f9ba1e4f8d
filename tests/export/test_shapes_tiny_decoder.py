"""The built-in model's tiny-decoder stage (export/recipes/shapes/tiny_decoder.py): the recipe end to end at toy
sizes, and add_to_bundle, which must leave every other file and manifest entry of the shipped bundle as it was and
give a vae_decoder_tiny whose decode matches diffusers' AutoencoderTiny.decode of the same latents."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.builtin_model import default_bundle
from edgediff.bundle.reader import Bundle
from edgediff.errors import ExportError

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edgediff.export.recipes.shapes import tiny_decoder  # noqa: E402


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The recipe at toy sizes: 3 steps on 16 scenes and 2 + 1 of the model's own latents (training-split and
    held-out prompts), the generated ones twice in the pool, 8-cell crops, a smaller student than the default."""
    root = tmp_path_factory.mktemp("tiny-decoder")
    tiny_decoder.main(["--out", str(root / "taesd"), "--bundle-out", str(root / "bundle"), "--steps", "3",
                       "--scenes", "16", "--generated", "2", "--generated-heldout", "1", "--generated-repeat", "2",
                       "--batch", "4", "--blocks", "1,1,0", "--crop", "8"])
    return root


def test_recipe_writes_the_autoencoder_its_log_and_a_verified_bundle(recipe_run):
    log = json.loads((recipe_run / "taesd" / "train_log.json").read_text())
    assert log["distil"]["steps"] == 3
    assert log["teacher"] == {**log["teacher"], "scenes": 16, "generated": 2, "generated_heldout": 1}
    assert log["decoder_blocks"] == [1, 1, 0] and log["distil"]["crop"] == 8 and log["generated_repeat"] == 2
    assert log["distil"]["pool"] == 16 + 2 * 3  # the generated latents twice
    cfg = json.loads((recipe_run / "taesd" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny" and cfg["num_decoder_blocks"] == [1, 1, 0]
    assert cfg["scaling_factor"] == tiny_decoder.LATENT_SCALE != 1.0  # read by the runtime: latents / scale
    out = Bundle.open(recipe_run / "bundle")
    assert out.verify() == []


def test_the_bundle_keeps_every_other_entry(recipe_run):
    old, new = Bundle.open(default_bundle()).manifest, Bundle.open(recipe_run / "bundle").manifest
    kept = {n: c for n, c in old.components.items() if n != "vae_decoder_tiny"}  # (the shipped one is replaced)
    assert set(new.components) == set(kept) | {"vae_decoder_tiny"}
    assert all(new.components[n] == c for n, c in kept.items())
    tiny_config = "vae_decoder_tiny/config.json"
    assert {f for f in old.files if f.path != tiny_config} == {f for f in new.files if f.path != tiny_config}
    assert tiny_config in {f.path for f in new.files}
    assert (new.defaults, new.scaling_factor, new.family) == (old.defaults, old.scaling_factor, old.family)
    receipt = new.components["vae_decoder_tiny"].parity
    assert receipt.passed and "AutoencoderTiny" in receipt.reference
    assert new.provenance.transforms[-1].startswith("vae_decoder_tiny distilled from vae_decoder")


def test_decoder_tiny_decodes_as_diffusers_autoencoder_tiny(recipe_run):
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny.from_pretrained(recipe_run / "taesd").eval()
    prompt = "a small red circle in the top left corner on a white background"
    with Pipeline.load(recipe_run / "bundle") as pipe:
        res = pipe(prompt, seed=3, num_inference_steps=2, output_type="latent")
        ours = np.asarray(pipe(prompt, seed=3, num_inference_steps=2, decoder="tiny", output_type="np").images[0])
    with torch.no_grad():  # diffusers pipelines' convention: latents / scaling_factor, pixels [-1, 1] -> [0, 1]
        z = torch.from_numpy(res.latents) / model.config.scaling_factor
        theirs = model.decode(z).sample[0].permute(1, 2, 0).numpy() / 2 + 0.5
    assert np.abs(ours - np.clip(theirs, 0, 1)).max() <= 1e-3


def test_an_autoencoder_of_another_scale_is_refused_and_nothing_written(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).save_pretrained(tmp_path / "taesd8x")
    with pytest.raises(ExportError, match="8 pixels per cell, the bundle 4 and 4"):
        tiny_decoder.add_to_bundle(default_bundle(), tmp_path / "taesd8x", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [(["--blocks", "2"], "expected counts"),
                                           (["--blocks", "2,x,0"], "expected counts"),
                                           (["--latent-scale", "0"], "must be positive"),
                                           (["--crop", "0"], "must be positive"),
                                           (["--generated-repeat", "0"], "must be positive"),
                                           (["--outline-weight", "-1"], "at least 0"),
                                           (["--teacher-threads", "-1"], "at least 0"),
                                           (["--threads", "0"], "must be at least 1")])
def test_bad_options_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tiny_decoder.main(["--out", str(tmp_path / "taesd"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "taesd").exists()


def test_the_student_sees_the_shape_through_its_clamp():
    """AutoencoderTiny's decoder opens with tanh(x / 3) * 3. The built-in model's latents reach ~+-20 under the shape;
    read / LATENT_SCALE, values 8 and 16 still differ after the clamp by a tenth of its range (at scale 1: 0.03)."""
    def clamp(v):
        return 3 * np.tanh(v / 3)

    scale = tiny_decoder.LATENT_SCALE
    assert clamp(16 / scale) - clamp(8 / scale) > 0.3 > clamp(16) - clamp(8)


def test_teacher_weights_balance_shape_and_a_noisy_background():
    """A teacher's black background varies by ~0.1: it is background (weight 1), and the shape's pixels together
    weigh as much as the background's (stage 1b's balance); stage 1b's corner rule took the noise for shape."""
    from edgediff.export.recipes.shapes.train import shape_balanced_weight

    g = torch.Generator().manual_seed(0)
    x = -0.75 + 0.05 * torch.randn(2, 3, 64, 64, generator=g)
    x[:, 0, 10:18, 30:38] = 0.9  # a small red square: 64 of 4096 pixels
    w = tiny_decoder.teacher_shape_weight(x)
    shape = torch.zeros_like(w, dtype=torch.bool)
    shape[:, :, 10:18, 30:38] = True
    assert torch.all(w[~shape] == 1)
    assert torch.allclose(w[shape].sum(), w[~shape].sum(), rtol=1e-5)
    assert shape_balanced_weight(x)[~shape].mean() < 0.1  # why the stage 1b rule does not fit teacher images


def test_the_outline_is_where_the_judge_draws_the_shape_edge():
    """teacher_outline marks exactly the pixels whose 3x3 neighbourhood holds both sides of the judge's mask edge
    (distance from the border pixels' median above half its peak): checked against a direct neighbourhood scan."""
    from edgediff.export.recipes.shapes.dataset import POSITIONS, Scene, render

    scene = Scene(shape="cross", colour="blue", size="large", position=POSITIONS[4], background="gray")
    image = render(scene)  # (64, 64, 3) uint8
    x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    outline = tiny_decoder.teacher_outline(x)[0, 0].numpy()
    dist = np.linalg.norm(image.astype(np.float32) - image[0, 0].astype(np.float32), axis=-1)
    mask = np.pad(dist > 0.5 * dist.max(), 1, mode="edge")
    want = np.zeros((64, 64))
    for y in range(64):
        for x_ in range(64):
            window = mask[y:y + 3, x_:x_ + 3]
            want[y, x_] = float(window.any() and not window.all())
    assert 0 < want.sum() < 64 * 64 / 4 and np.array_equal(outline, want)
