"""CLIP's BPE tokenizer, built with the `tokenizers` library from a bundle's tokenizer files (vocab.json +
merges.txt as in SD 1.x/2.x folders, or tokenizer.json), padded and truncated to the text encoder's length
exactly as diffusers does (padding="max_length", truncation=True)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import BundleError

# CLIP's pre-tokenization: contractions, letter runs, single digits, runs of other non-space symbols
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map: the 256 base symbols of the BPE vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_UNICODE_TO_BYTE = {u: b for b, u in bytes_to_unicode().items()}


def _token(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by transformers
        return value.get("content")
    return value


class ClipTokenizer:
    def __init__(self, tokenizer, *, max_length: int, bos: str, eos: str, pad: str):
        self._tok = tokenizer
        self.max_length = max_length
        ids = {name: tokenizer.token_to_id(t) for name, t in (("bos", bos), ("eos", eos), ("pad", pad))}
        missing = [f"{k}={t!r}" for (k, v), t in zip(ids.items(), (bos, eos, pad)) if v is None]
        if missing:
            raise BundleError(f"tokenizer: special token(s) {', '.join(missing)} not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def from_dir(cls, path: Path, max_length: int | None = None) -> "ClipTokenizer":
        from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        path = Path(path)
        config = _read(path / "tokenizer_config.json")
        special = _read(path / "special_tokens_map.json")
        get = lambda key, default: _token(special.get(key)) or _token(config.get(key)) or default  # noqa: E731
        bos, eos = get("bos_token", "<|startoftext|>"), get("eos_token", "<|endoftext|>")
        unk, pad = get("unk_token", eos), get("pad_token", eos)
        length = int(config.get("model_max_length", 77))
        length = min(length, max_length) if max_length else length
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(l.split()) for l in lines if l and not l.startswith("#version")]
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                                end_of_word_suffix="</w>", fuse_unk=False))
            tok.normalizer = normalizers.Sequence(
                [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ])
        elif (path / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            tok.post_processor = None  # we add BOS/EOS ourselves, the same way for both formats
            tok.no_padding()
            tok.no_truncation()
        else:
            raise BundleError(f"{path}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
        return cls(tok, max_length=length, bos=bos, eos=eos, pad=pad)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, max_length) int64: BOS, tokens, EOS, then padding; over-long prompts are cut (with a warning)."""
        room = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)  # (B, L) int64
        for b, enc in enumerate(self._tok.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > room:
                cut = self.decode(ids[room:])
                warnings.warn(f"prompt truncated to CLIP's {self.max_length} tokens; dropped: {cut!r}", stacklevel=3)
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            out[b, : len(row)] = row
        return out


    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (for messages): undo the byte-level mapping, '</w>' ends a word."""
        text = "".join(self._tok.id_to_token(int(i)) or "" for i in ids).replace("</w>", " ")
        words = text.split(" ")
        return " ".join(bytes(_UNICODE_TO_BYTE.get(c, 32) for c in w).decode("utf-8", "replace") for w in words).strip()


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON (line {exc.lineno})") from None
    return data if isinstance(data, dict) else {}
