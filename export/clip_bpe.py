"""Train a small CLIP-format BPE tokenizer from a list of texts.

Writes the files OpenAI CLIP and transformers' ``CLIPTokenizer`` read: ``vocab.json`` (the 256 byte-level symbols,
the same with ``</w>``, one entry per merge, then ``<|startoftext|>``, ``<|endoftext|>``), ``merges.txt``
(``#version: 0.2`` then one merge per line), ``tokenizer_config.json`` and ``special_tokens_map.json``.

For test fixtures and the built-in default model, whose captions need a few hundred merges, not CLIP's 48,894.
Words are cut exactly as the runtime and transformers cut them (NFC, whitespace runs -> one space, lowercase,
CLIP's regex, byte-level map), using the ``tokenizers`` objects of ``edgediff.tokenizer``. No torch.

    train_clip_bpe(["a small red circle in the top left corner on a white background", ...], 200, Path("tok"))
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from edgediff.errors import InputError
from edgediff.tokenizer import BOS, EOS, bytes_to_unicode, clip_normalizer, clip_pre_tokenizer

EOW = "</w>"  # CLIP marks the last symbol of every word


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """Byte-level words of ``texts`` with their counts, cut as CLIP cuts them; special tokens are not words."""
    norm, pre = clip_normalizer(), clip_pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"train_clip_bpe: texts must be strings, got {type(text).__name__}")
        text = text.replace(BOS, " ").replace(EOS, " ")  # special tokens split the text, as in transformers
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def learn_merges(counts: Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al. 2016, Alg. 1) over words whose last symbol carries ``</w>``.

    Each round merges the most frequent adjacent pair. Ties go to the lexicographically smallest pair (code point
    order), so the result depends only on the word counts. Stops early when no pair is left.
    """
    # word as a tuple of symbols -> count; "cat" -> ("c", "a", "t</w>")
    words: dict[tuple[str, ...], int] = {tuple(w[:-1]) + (w[-1] + EOW,): c for w, c in sorted(counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for sym, c in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = _apply(words, best)
    return merges


def _apply(words: dict[tuple[str, ...], int], pair: tuple[str, str]) -> dict[tuple[str, ...], int]:
    """Replace every occurrence of ``pair`` (left to right, non-overlapping) by the merged symbol."""
    merged = pair[0] + pair[1]
    out: dict[tuple[str, ...], int] = {}
    for sym, c in words.items():
        new, i = [], 0
        while i < len(sym):
            if i + 1 < len(sym) and sym[i] == pair[0] and sym[i + 1] == pair[1]:
                new.append(merged)
                i += 2
            else:
                new.append(sym[i])
                i += 1
        out[tuple(new)] = out.get(tuple(new), 0) + c
    return out


def train_clip_bpe(texts: Iterable[str], num_merges: int, out_dir: Path, *, model_max_length: int = 77,
                   pad_token: str = EOS) -> Path:
    """Learn ``num_merges`` BPE merges from ``texts`` and write a CLIP tokenizer folder to ``out_dir`` (returned).

    ``pad_token``: ``"<|endoftext|>"`` as SD 1.x, or ``"!"`` (id 0) as SD 2.x; it must be in the vocabulary.
    """
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
        raise InputError(f"train_clip_bpe: num_merges={num_merges!r}; expected an integer >= 0")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 3:
        raise InputError(f"train_clip_bpe: model_max_length={model_max_length!r}; expected an integer >= 3 (BOS, EOS "
                         "and at least one token)")
    if isinstance(texts, str):
        raise InputError("train_clip_bpe: texts must be an iterable of strings, not one string")
    merges = learn_merges(word_counts(texts), num_merges)

    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in [*base, *(s + EOW for s in base), *("".join(m) for m in merges), BOS, EOS]:
        vocab.setdefault(tok, len(vocab))  # two merges can spell the same symbol ("ab"+"c", "a"+"bc"): keep one id
    if pad_token not in vocab:
        raise InputError(f"train_clip_bpe: pad_token={pad_token!r} is not in the vocabulary; use {EOS!r} (SD 1.x) "
                         "or '!' (SD 2.x)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {**special, "model_max_length": model_max_length, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": True,
              "errors": "replace", "add_prefix_space": False}
    _write(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write(out_dir / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    _write(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out_dir


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
