"""export/clip_bpe.py: the CLIP-format BPE learner. Reference: transformers 5.x ``CLIPTokenizer`` loading its files."""
from __future__ import annotations

import json

import pytest

from edgediff.errors import InputError
from edgediff.export.clip_bpe import learn_merges, train_clip_bpe, word_counts
from edgediff.tokenizer import bytes_to_unicode

CAPTIONS = [
    "a small red circle in the top left corner on a white background",
    "a large blue square in the bottom right corner on a black background",
    "a small green triangle in the center on a white background",
]


def test_files_follow_clip_layout(tmp_path):
    out = train_clip_bpe(CAPTIONS, 40, tmp_path / "tok", model_max_length=24, pad_token="!")
    assert out == tmp_path / "tok"
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    base = list(bytes_to_unicode().values())
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:256] == base and tokens[256:512] == [s + "</w>" for s in base]
    assert vocab["!"] == 0  # SD2 pads with "!", id 0, as in OpenAI's vocabulary
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert lines[0] == "#version: 0.2" and len(lines) == 41
    assert tokens[512:-2] == ["".join(line.split()) for line in lines[1:]]
    assert list(vocab.values()) == list(range(len(vocab)))
    config = json.loads((out / "tokenizer_config.json").read_text())
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert config["model_max_length"] == 24 and config["do_lower_case"] is True
    assert special == {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "pad_token": "!"}


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_loads_in_transformers(tmp_path, pad):
    transformers = pytest.importorskip("transformers")
    out = train_clip_bpe(CAPTIONS * 5, 200, tmp_path / "tok", model_max_length=24, pad_token=pad)
    tok = transformers.CLIPTokenizer.from_pretrained(out)
    assert (tok.model_max_length, tok.pad_token, tok.bos_token, tok.eos_token) == (24, pad, "<|startoftext|>",
                                                                                  "<|endoftext|>")
    ids = tok(["A small  RED circle\tin the top left corner"], padding="max_length", max_length=24).input_ids[0]
    words = tok.convert_ids_to_tokens(ids)
    # every caption word is a single token after training on the captions
    assert words[:10] == ["<|startoftext|>", "a</w>", "small</w>", "red</w>", "circle</w>", "in</w>", "the</w>",
                          "top</w>", "left</w>", "corner</w>"]
    assert words[10] == "<|endoftext|>" and set(ids[11:]) == {tok.pad_token_id}
    assert tok.decode(ids, skip_special_tokens=True) == "a small red circle in the top left corner"


def test_bpe_counts_and_tie_break():
    # ab x2, ac x1: the frequent pair first, then the only one left; stops early when nothing is left to merge
    assert learn_merges(word_counts(["ab ab ac"]), 5) == [("a", "b</w>"), ("a", "c</w>")]
    # a tie goes to the smaller pair in code-point order, whatever the text order
    assert learn_merges(word_counts(["ac ab"]), 1) == [("a", "b</w>")]
    assert word_counts(["Hello,  WORLD!\n<|endoftext|>"]) == {"hello": 1, ",": 1, "world": 1, "!": 1}


def test_deterministic(tmp_path):
    a = train_clip_bpe(CAPTIONS, 30, tmp_path / "a")
    b = train_clip_bpe(list(reversed(CAPTIONS)), 30, tmp_path / "b")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    zero = train_clip_bpe(CAPTIONS, 0, tmp_path / "z")
    assert len(json.loads((zero / "vocab.json").read_text())) == 514


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_merges=-1), "num_merges"),
    (dict(num_merges=2.5), "num_merges"),
    (dict(model_max_length=2), "model_max_length"),
    (dict(pad_token="<pad>"), "pad_token"),
    (dict(texts="one string"), "not one string"),
    (dict(texts=["ok", 3]), "must be strings"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(texts=CAPTIONS, num_merges=10, out_dir=tmp_path / "t") | kwargs
    with pytest.raises(InputError, match=match):
        train_clip_bpe(args.pop("texts"), args.pop("num_merges"), args.pop("out_dir"), **args)
