"""runtime/tokenizer.py against transformers 5.x ``CLIPTokenizer`` (and ``CLIPTokenizerFast`` where it is another
class) called as diffusers 0.42 calls it: padding="max_length", max_length=model_max_length, truncation=True.
Tolerance: none, ids must be equal."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from edgediff.errors import BundleError, InputError
from edgediff.export.clip_bpe import train_clip_bpe
from edgediff.tokenizer import ClipTokenizer

CORPUS = [
    "a small red circle in the top left corner on a white background",
    "a photograph of an astronaut riding a horse, 35mm, f/1.8",
    "ein Hund im Schnee", "un château au bord de la mer", "東京の夜景", "it's a dog's life, isn't it?",
    "café naïve señor", "😀 smile",
] * 2
PROMPTS = [
    "", " ", "A small RED circle!!", "  tabs\tand\nnewlines \r\n  ", "café CAFÉ cafe\u0301 naïve Ångström",
    "東京の夜景、とても綺麗", "😀🐱‍👤 emoji 👍🏽", "it's DON'T we'll I'd 123 4.5 2024", "<|endoftext|> inside <|startoftext|>",
    "!!! ?? ... !?", "hello_world foo-bar (x) [y] {z}", "½ ² Ⅻ", "a\u00a0b\u2003c", "ǅ ß ẞ İ", "ﬁ ligature",
    "red " * 40, "a photograph of an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation",
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad", "sd2-pad"])
def tok_dir(request, tmp_path_factory):
    return train_clip_bpe(CORPUS, 150, tmp_path_factory.mktemp("tok") / "tokenizer", model_max_length=20,
                          pad_token=request.param)


def _references():
    transformers = pytest.importorskip("transformers")
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)  # transformers 5: the same class
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return classes


def test_ids_equal_transformers(tok_dir, tmp_path):
    ours = ClipTokenizer.from_dir(tok_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours.encode(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 20)
    for cls in _references():
        ref = cls.from_pretrained(tok_dir)
        want = np.array(ref(PROMPTS, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids)
        bad = [(p, w.tolist(), g.tolist()) for p, w, g in zip(PROMPTS, want, got) if (w != g).any()]
        assert not bad, f"{cls.__name__}: first mismatch {bad[0]}"
        # the same tokenizer saved by transformers 5 (tokenizer.json only) reads to the same ids
        ref.save_pretrained(tmp_path / cls.__name__)
        again = ClipTokenizer.from_dir(tmp_path / cls.__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert (again.encode(PROMPTS) == want).all()
    pad = json.loads((tok_dir / "special_tokens_map.json").read_text())["pad_token"]
    assert ours.pad_id == (0 if pad == "!" else ours.eos_id)  # SD2 pads with "!" = id 0, SD1 with <|endoftext|>


def test_truncation_warns_with_the_cut_words(tok_dir):
    tok = ClipTokenizer.from_dir(tok_dir)
    with pytest.warns(UserWarning, match=r"prompt 1 is longer .* 20 tokens; this part was cut: 'horse horse'"):
        ids = tok.encode(["a red circle", "a " * 18 + "horse horse"])
    assert ids[1, -1] == tok.eos_id and ids[1, 0] == tok.bos_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits exactly does not warn
        tok.encode(["a " * 18])


def test_max_length_argument_wins(tok_dir):
    tok = ClipTokenizer.from_dir(tok_dir, max_length=8)
    assert tok.encode([""]).tolist() == [[tok.bos_id, tok.eos_id] + [tok.pad_id] * 6]
    with pytest.raises(InputError, match="max_length=2"):
        ClipTokenizer.from_dir(tok_dir, max_length=2)


def test_encode_rejects_non_lists(tok_dir):
    tok = ClipTokenizer.from_dir(tok_dir)
    with pytest.raises(InputError, match="list of strings"):
        tok.encode("a red circle")
    with pytest.raises(InputError, match="list of strings"):
        tok.encode(["ok", None])


def _copy(tok_dir, tmp_path, drop=()):
    out = tmp_path / "t"
    shutil.copytree(tok_dir, out)
    for name in drop:
        (out / name).unlink()
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda d: (d / "tokenizer_config.json").write_text("{oops"), "not valid JSON"),
    (lambda d: (d / "special_tokens_map.json").write_text("[1]"), "must hold a JSON object"),
    (lambda d: (d / "special_tokens_map.json").write_text('{"pad_token": 5}'), "pad_token must be a string"),
    (lambda d: (d / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}'), r"\['<pad>'\] are not in"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"model_max_length": 1e30}'), "model_max_length="),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\na b c\n"), "line 2"),
    (lambda d: (d / "vocab.json").write_text('{"a": "x"}'), "integer ids"),
    (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"}'), "tokenizer.json cannot be read"),
    (lambda d: [(d / n).unlink() for n in ("vocab.json",)], "no tokenizer files"),
    (lambda d: (d / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe a\n"), r"merges.txt is not UTF-8 text \(byte 14"),
    (lambda d: (d / "vocab.json").write_bytes(b'{"a\xff": 1}'), "vocab.json is not UTF-8 text"),
    (lambda d: (d / "tokenizer.json").write_bytes(b'{"\xc3": 1}'), "tokenizer.json is not UTF-8 text"),
    (lambda d: (d / "tokenizer_config.json").write_bytes(b"\xff"), "tokenizer_config.json is not UTF-8 text"),
    (lambda d: (d / "vocab.json").write_text("[" * 100_000 + "]" * 100_000), "vocab.json is not valid JSON"),
    (lambda d: (d / "vocab.json").write_text('{"a": true}'), "integer ids"),
])
def test_broken_folders(tok_dir, tmp_path, edit, match):
    d = _copy(tok_dir, tmp_path)
    edit(d)
    with pytest.raises(BundleError, match=match):
        ClipTokenizer.from_dir(d)


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="tokenizer folder not found"):
        ClipTokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize("merges, match", [
    ("z z\nq zz\n", "line 3"),  # "q" + "zz" -> "qzz" is not in the vocabulary
    ("qz zz\n", "do not fit together"),  # "qzzz" is, but its part "qz" is not
])
def test_merges_not_fitting_vocab(tok_dir, tmp_path, merges, match):
    d = _copy(tok_dir, tmp_path)
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    vocab.update(zz=len(vocab), qzzz=len(vocab) + 1)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    with pytest.raises(BundleError, match=match):
        ClipTokenizer.from_dir(d)


@pytest.mark.parametrize("prompt, position", [("red \udcff circle", 4), ("\ud800", 0), ("ok", None)])
def test_prompt_that_is_not_unicode_text(tok_dir, prompt, position):
    """A non-UTF-8 byte in a command line arrives as a lone surrogate ("\\udcff"); an API caller can pass one too.
    `tokenizers` raised TypeError on it; it is an InputError naming the position."""
    tok = ClipTokenizer.from_dir(tok_dir)
    if position is None:
        tok.encode(["fine", prompt])
        return
    with pytest.raises(InputError, match=rf"prompt 1 is not valid Unicode text \(position {position}"):
        tok.encode(["fine", prompt])


def test_non_unicode_prompt_through_the_api_and_the_cli(tmp_path):
    from click.testing import CliRunner

    from edgediff.builtin_model import default_bundle
    from edgediff.cli import main
    from edgediff.pipeline import Pipeline

    with Pipeline.load(default_bundle()) as p, pytest.raises(InputError, match="not valid Unicode text"):
        p("red \udcff circle", num_inference_steps=1)
    out = tmp_path / "o.png"
    r = CliRunner().invoke(main, ["generate", "red \udcff circle", "--steps", "1", "-o", str(out)])
    assert r.exit_code == 2 and "not valid Unicode text" in r.output and "internal error" not in r.output, r.output
    assert not out.exists()


def test_from_files_reads_only_the_files_given(tok_dir, tmp_path):
    """A bundle hands the tokenizer its pinned files by name: a tokenizer.json planted next to them is not read."""
    d = _copy(tok_dir, tmp_path)
    names = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
    want = ClipTokenizer.from_dir(d).encode(["a small red circle"])
    (d / "tokenizer.json").write_text("this file is never read")
    with pytest.raises(BundleError, match="tokenizer.json cannot be read"):
        ClipTokenizer.from_dir(d)  # proof that a folder scan would read it
    got = ClipTokenizer.from_files({n: d / n for n in names if (d / n).exists()}).encode(["a small red circle"])
    assert (got == want).all()
    with pytest.raises(BundleError, match="not tokenizer files"):
        ClipTokenizer.from_files({"added_tokens.json": d / "vocab.json"})
