"""A tiny T5 tokenizer built in-process: a Unigram model trained with the `tokenizers` library on a small corpus and
saved by transformers' T5TokenizerFast (tokenizer.json + tokenizer_config.json), with transformers' tokenizer for
reference. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a photograph of an astronaut riding a horse", "a red circle on a white background", "an oil painting of a cat",
    "a watercolor of a lighthouse at dusk", "city street at night, rain, neon signs", "a bowl of fruit on a table",
]


def tiny_t5_tokenizer(folder: Path):
    """(folder with the T5 tokenizer files, transformers' T5TokenizerFast loaded from it)."""
    from transformers import AutoTokenizer

    from edgediff.export.random_sd3 import train_t5_tokenizer

    train_t5_tokenizer(CORPUS, folder)
    return folder, AutoTokenizer.from_pretrained(folder)
