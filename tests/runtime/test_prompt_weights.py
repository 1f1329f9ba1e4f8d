"""Long and weighted prompts (runtime/prompt_weights.py, families/sd.py) against a reference implementation.

Reference: AUTOMATIC1111's stable-diffusion-webui semantics, written out below independently of the runtime's code
(its ``parse_prompt_attention`` as published in modules/prompt_parser.py, and the "Original" emphasis of
modules/sd_hijack_clip.py / sd_emphasis.py: chunks of 75 tokens with BOS/EOS/padding, each encoded by the text
encoder, multiplied token-wise by the weights and rescaled to the chunk's unweighted mean; shorter prompts padded
with the empty prompt's chunk), computed with transformers' CLIPTokenizer and CLIPTextModel (torch) from the same
tiny source. Tolerance: 1e-5 on the embeddings.

compel is not the reference: its grammar is not A1111's (``(word)1.3``, ``word++``; ``[...]`` is not a down-weight),
it weights relative to the empty prompt's embedding and down-weights by masking tokens out through the text
encoder's attention mask, which an exported text encoder (``input_ids`` only, as optimum exports it) does not take.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import warnings

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.errors import InputError
from edgediff.prompt_weights import parse
from edgediff.timing import Stopwatch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5


# -- the reference: A1111's parser, as published (it closes unbalanced brackets silently; the runtime refuses them) --
re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)


def a1111_parse(text):
    res = []
    round_brackets = []
    square_brackets = []
    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith('\\'):
            res.append([text[1:], 1.0])
        elif text == '(':
            round_brackets.append(len(res))
        elif text == '[':
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ')' and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == ']' and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            res.append([text, 1.0])
    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)
    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def reference_embeddings(source, texts):
    """A1111's conditioning of each text, padded to a common chunk count with the empty prompt's chunk:
    (T, C * 77, D) float32."""
    tok = transformers.CLIPTokenizer.from_pretrained(source / "tokenizer")
    te = transformers.CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    length, room = tok.model_max_length, tok.model_max_length - 2

    def encode(ids, mult):
        tokens = [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (room - len(ids))
        multipliers = torch.tensor([1.0, *mult, 1.0] + [1.0] * (room - len(ids)))
        with torch.no_grad():
            z = te(torch.tensor([tokens])).last_hidden_state  # (1, 77, D)
        original_mean = z.mean()
        z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        new_mean = z.mean()
        return z * (original_mean / new_mean)

    per_text = []
    for text in texts:
        ids, mult = [], []
        for piece, weight in a1111_parse(text):
            piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
            ids += piece_ids
            mult += [weight] * len(piece_ids)
        chunks = max(1, -(-len(ids) // room))
        per_text.append([encode(ids[k * room:(k + 1) * room], mult[k * room:(k + 1) * room]) for k in range(chunks)])
    empty = encode([], [])
    most = max(len(c) for c in per_text)
    rows = [torch.cat(c + [empty] * (most - len(c)), dim=1) for c in per_text]
    assert rows[0].shape[1] == most * length
    return torch.cat(rows).numpy()


@pytest.fixture(scope="module")
def weighted_source(tiny_sd1_source, tmp_path_factory):
    """tiny-sd1 with a random bias in the text encoder's final layer norm. Randomly initialised, that bias is 0,
    so every token's features average to ~0 and the mean rescaling divides ~0 by ~0 (noise); trained CLIP towers
    have a bias, and so a mean well away from 0. Only the text encoder differs."""
    dst = tmp_path_factory.mktemp("src") / "tiny-sd1-ln-bias"
    shutil.copytree(tiny_sd1_source, dst)
    te = transformers.CLIPTextModel.from_pretrained(dst / "text_encoder")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        te.get_parameter("final_layer_norm.bias").copy_(torch.randn(te.config.hidden_size, generator=g) * 0.5 + 0.3)
    te.save_pretrained(dst / "text_encoder", safe_serialization=True)
    return dst


@pytest.fixture(scope="module")
def weighted_bundle(weighted_source, tmp_path_factory):
    from edgediff.export.pipeline_export import export_pipeline

    return export_pipeline(weighted_source, tmp_path_factory.mktemp("bundles") / "tiny-sd1-ln-bias")


@pytest.fixture(scope="module")
def ours(weighted_bundle):
    return Pipeline.load(weighted_bundle)


def embeddings(pipe, prompt, negative=None, guidance=1.0):
    req = pipe.request(prompt, negative, guidance_scale=guidance, num_inference_steps=2)
    return pipe.conditioner(req, pipe.components, Stopwatch()).encoder_hidden_states


LONG = ("a watercolor landscape with mountains and a lake at sunset, " * 5 +
        "(a small blue square:1.4) in the top left corner, [city street at night, rain], " * 3)


# -- the grammar ---------------------------------------------------------------------------------------------------
A1111_EXAMPLES = [  # A1111's own doctest examples (balanced ones) and more
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    # A1111's last example leaves its first "(" open (closed at the end, so "." is 1.1); closed here explicitly
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_parse_matches_a1111_examples(text, expected):
    assert [list(p) for p in parse(text)] == expected == a1111_parse(text)


def test_parse_matches_a1111_on_random_balanced_prompts():
    """Random nestings of words, brackets, weights, escapes and colons: the same pieces and the same floats."""
    rng = np.random.default_rng(0)
    words = ["cat", "a red apple", " ", ", ", ":", "\\(", "\\)", "\\[", "\\]", "\\\\", "x:y", "1.5"]

    def gen(depth=0):
        out = []
        for _ in range(int(rng.integers(1, 5))):
            r = rng.random()
            if depth < 4 and r < 0.25:
                out.append("(" + gen(depth + 1) + ")")
            elif depth < 4 and r < 0.4:
                out.append("(" + gen(depth + 1) + f":{rng.choice(['1.3', '0.5', ' 2 ', '.7', '+1.1'])})")
            elif depth < 4 and r < 0.55:
                out.append("[" + gen(depth + 1) + "]")
            else:
                out.append(str(rng.choice(words)))
        return "".join(out)

    for _ in range(500):
        text = gen()
        assert [list(p) for p in parse(text)] == a1111_parse(text), text


@pytest.mark.parametrize("text,char,bracket", [
    ("a (cat", 3, "("), ("a cat)", 6, ")"), ("[a cat", 1, "["), ("a] cat", 2, "]"), ("((cat:1.2)", 1, "("),
    ("cat:1.2)", 8, ")"), ("(a) b) c", 6, ")"), ("smile :)", 8, ")"),
])
def test_unbalanced_bracket_is_one_line_naming_its_character(text, char, bracket):
    with pytest.raises(InputError) as err:
        parse(text)
    msg = str(err.value)
    assert f"unbalanced '{bracket}' at character {char} " in msg and "\\" + bracket in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["(cat:.)", "(cat:1.2.3)", "(cat:-.)"])
def test_weight_that_is_not_a_number_is_refused(text):
    with pytest.raises(InputError, match="is not a number"):
        parse(text)


# -- embeddings against the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [
    "a red circle on a white background",
    "a (red:1.5) circle on a [white] background, ((cat))",
    LONG,
    "(" + LONG + ":0.8)",
    "",
])
def test_embeddings_match_the_a1111_reference(ours, weighted_source, prompt):
    mine = embeddings(ours, prompt)
    theirs = reference_embeddings(weighted_source, [prompt])
    assert mine.shape == theirs.shape
    err = float(np.max(np.abs(mine - theirs)))
    assert err <= TOL, f"max abs {err:.2e} at {np.unravel_index(np.argmax(np.abs(mine - theirs)), mine.shape)}"


def test_long_prompt_and_short_negative_are_padded_to_the_same_chunks(ours, weighted_source):
    mine = embeddings(ours, LONG, "blurry, (low quality:1.2)", guidance=7.0)  # [uncond; cond]
    theirs = reference_embeddings(weighted_source, ["blurry, (low quality:1.2)", LONG])
    assert mine.shape == theirs.shape and mine.shape[1] >= 2 * 77
    assert float(np.max(np.abs(mine - theirs))) <= TOL


def test_plain_prompts_are_diffusers_embeddings_exactly(ours, weighted_source):
    """No syntax, <= 75 tokens: the tokens and the embeddings diffusers' encode_prompt gives, bit for bit the
    same call as before weighting existed (one 77-token chunk, no rescaling)."""
    from edgediff import prompt_weights

    texts = ["a red circle on white", "an astronaut riding a horse: at night, 50% off!", ""]
    tokens = prompt_weights.weighted_tokens(ours.conditioner.tokenizer, texts)
    chunks = prompt_weights.chunk(ours.conditioner.tokenizer, tokens, long=True)
    assert chunks.weights is None and chunks.ids.shape == (3, 1, 77)
    np.testing.assert_array_equal(chunks.ids[:, 0], ours.conditioner.tokenizer.encode(texts))
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(weighted_source, safety_checker=None,
                                                                requires_safety_checker=False, local_files_only=True)
    with torch.no_grad():
        theirs, _ = ref.encode_prompt(texts, "cpu", 1, False)
    mine = embeddings(ours, texts)
    assert float(np.max(np.abs(mine - theirs.numpy()))) <= TOL


def test_long_weighted_prompt_image_matches_diffusers_given_the_reference_embeddings(ours, weighted_source):
    """The whole pipeline with a 3-chunk prompt: the exported UNet attends over 231 tokens, and the image is
    diffusers' StableDiffusionPipeline given the reference's prompt_embeds / negative_prompt_embeds."""
    diffusers = pytest.importorskip("diffusers")
    from streams import StreamFrom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(weighted_source, safety_checker=None,
                                                                requires_safety_checker=False, local_files_only=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    neg, pos = reference_embeddings(weighted_source, ["blurry", LONG])
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    theirs = ref(prompt_embeds=torch.from_numpy(pos[None]), negative_prompt_embeds=torch.from_numpy(neg[None]),
                 num_inference_steps=4, guidance_scale=7.0, latents=torch.from_numpy(latents),
                 generator=torch.Generator().manual_seed(1), output_type="np").images
    mine = ours(LONG, "blurry", num_inference_steps=4, guidance_scale=7.0, latents=latents, scheduler="euler",
                rng=StreamFrom(1), output_type="np").images
    err = float(np.max(np.abs(np.stack(mine) - theirs)))
    assert err <= 1e-3 and theirs.std() > 0.01, f"max abs {err:.2e}"


def test_fixed_text_axis_truncates_with_the_warning(tiny_sd1_bundle, tmp_path):
    """A bundle whose denoiser's text axis is fixed at 77 (edgediff optimize --static) cannot take chunks: the
    prompt is cut at 75 tokens with a warning naming the dropped words, as before."""
    from edgediff.bundle.manifest import TensorSpec
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    dst = tmp_path / "fixed"
    shutil.copytree(tiny_sd1_bundle, dst)
    m = Bundle.open(dst).manifest
    unet = m.components["unet"]
    inputs = tuple(TensorSpec(s.name, s.dtype, (s.shape[0], 77, s.shape[2])) if s.name == "encoder_hidden_states"
                   else s for s in unet.inputs)
    write_manifest(dst, dataclasses.replace(m, components={**m.components,
                                                           "unet": dataclasses.replace(unet, inputs=inputs)}))
    with Pipeline.load(dst) as pipe:
        assert not pipe.conditioner.long_prompts
        with pytest.warns(UserWarning, match="its text axis is fixed.*this part was cut"):
            hidden = embeddings(pipe, LONG)
        assert hidden.shape == (1, 77, 32)
    with Pipeline.load(tiny_sd1_bundle) as pipe:
        assert pipe.conditioner.long_prompts
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no truncation warning when the bundle takes chunks
            full = embeddings(pipe, LONG)
    np.testing.assert_allclose(hidden[0], full[0, :77], atol=TOL)  # the first chunk is the same


def test_native_tensorrt_engines_take_one_chunk(ours):
    """edgediff build's engines fix the text axis at 77 whatever the bundle says: on that backend the prompt is cut
    with the warning, not sent as 3 chunks the engine would refuse."""

    class OnTrt:  # the real graphs, reported as the native TensorRT backend
        backend = "trt"

        def use(self, name):
            return ours.components.use(name)

    req = ours.request(LONG, guidance_scale=1.0, num_inference_steps=2)
    with pytest.warns(UserWarning, match="a static bundle or a TensorRT engine"):
        hidden = ours.conditioner(req, OnTrt(), Stopwatch()).encoder_hidden_states
    assert hidden.shape == (1, 77, 32)
    assert ours.conditioner(req, ours.components, Stopwatch()).encoder_hidden_states.shape[1] > 77


def test_unbalanced_prompt_fails_before_any_work(ours, tiny_sd1_bundle, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli import main

    for kwargs, what in ((dict(prompt="a (cat"), "prompt"), (dict(prompt="a cat", negative_prompt="ugly]"),
                                                             "negative_prompt")):
        with pytest.raises(InputError, match=f"^{what}: unbalanced"):
            ours.request(**kwargs)
    out = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "a smiley :)", "-m", str(tiny_sd1_bundle), "-o", str(out)])
    assert r.exit_code == 2 and "unbalanced ')' at character 11" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    r = CliRunner().invoke(main, ["generate", "a smiley :\\)", "-m", str(tiny_sd1_bundle), "-o", str(out),
                                  "--steps", "1"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(out) as im:  # the prompt is recorded as written
        assert json.loads(im.info["parameters"])["prompt"] == "a smiley :\\)"
