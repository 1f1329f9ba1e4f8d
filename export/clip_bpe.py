"""Train a small CLIP-format BPE tokenizer (vocab.json + merges.txt, as OpenAI CLIP and transformers'
CLIPTokenizer read them) from a list of texts. For test fixtures and for the built-in default model, whose
captions need a few hundred merges, not CLIP's 49k. Plain Python; deterministic (ties broken by the pair itself).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from edgediff.tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenization pattern (letters, single digits, runs of other non-space symbols, English contractions)
_WORDS = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""", re.IGNORECASE)


def _words(text: str) -> list[str]:
    byte_map = bytes_to_unicode()
    text = re.sub(r"\s+", " ", text).strip().lower()
    return ["".join(byte_map[b] for b in w.encode("utf-8")) for w in _WORDS.findall(text)]


def learn_merges(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE (Sennrich et al. 2016) over CLIP-normalised words, the last symbol carrying '</w>'."""
    freq = Counter(w for t in texts for w in _words(t))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in freq.items()}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for sym, c in words.items():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + " " + kv[0][1]]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new = {}
        for sym, c in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


def train_clip_bpe(texts: Iterable[str], num_merges: int, out_dir: Path, *, model_max_length: int = 77,
                   pad_token: str = EOS) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(list(texts), num_merges)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for tok in vocab_list:  # a merge can repeat a base symbol's spelling; keep the first id
        vocab.setdefault(tok, len(vocab))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, model_max_length=model_max_length, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                  clean_up_tokenization_spaces=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir
