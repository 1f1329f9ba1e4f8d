"""The T5 tokenizer (runtime/t5_tokenizer.py) against transformers' T5TokenizerFast with diffusers' call
(padding="max_length", truncation=True, add_special_tokens=True), from the same tokenizer.json."""
from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import BundleError, InputError
from edgediff.t5_tokenizer import T5Tokenizer

pytest.importorskip("transformers")

from t5_fixtures import tiny_t5_tokenizer  # noqa: E402

PROMPTS = ["a red circle", "", "an  oil   painting of a cat!", "Ünïcödé zebra 42 ?", "a " * 300,
           "city street at night, rain, neon signs", "   leading and trailing   "]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder, ref = tiny_t5_tokenizer(tmp_path_factory.mktemp("t5"))
    files = {p.name: p for p in folder.iterdir()}
    return T5Tokenizer.from_files(files), ref


@pytest.mark.parametrize("length", [1, 2, 8, 77, 256])
def test_ids_match_transformers(tokenizers, length):
    ours, ref = tokenizers
    theirs = ref(PROMPTS, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                 return_tensors="np").input_ids
    mine = ours.encode(PROMPTS, length)
    assert mine.dtype == np.int64 and mine.shape == (len(PROMPTS), length)
    assert np.array_equal(mine, theirs)


def test_the_end_token_closes_every_row_and_pads_follow(tokenizers):
    ours, ref = tokenizers
    ids = ours.encode(["a red circle"], 16)[0]
    end = int(np.flatnonzero(ids == ref.eos_token_id)[0])
    assert (ids[end + 1:] == ref.pad_token_id).all() and end > 0


def test_missing_tokenizer_json_and_bad_length_are_one_line(tokenizers, tmp_path):
    ours, _ = tokenizers
    with pytest.raises(BundleError, match="no tokenizer.json"):
        T5Tokenizer.from_files({"tokenizer_config.json": tmp_path / "tokenizer_config.json"})
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="not a tokenizers tokenizer.json"):
        T5Tokenizer.from_files({"tokenizer.json": tmp_path / "tokenizer.json"})
    with pytest.raises(InputError, match="max_sequence_length 0"):
        ours.encode(["a"], 0)
