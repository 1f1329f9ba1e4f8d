"""CLIP's BPE tokenizer, built with the `tokenizers` library from a bundle's tokenizer files (vocab.json +
merges.txt as in SD 1.x/2.x folders, or tokenizer.json), padded and truncated to the text encoder's length
exactly as diffusers does (padding="max_length", truncation=True)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .bundle.layout import TOKENIZER_FILES
from .errors import BundleError, InputError

# CLIP's pre-tokenization (transformers' CLIPTokenizer, same as OpenAI's `pat`): the special tokens, English
# contractions, letter runs, single digits, runs of other non-space symbols. Whitespace separates and is dropped.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map, in CLIP's order (printable bytes first, then the rest
    mapped to U+0100...): the first 256 entries of a CLIP vocabulary, so "!" is id 0 (SD2's pad token)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def clip_normalizer():
    """NFC, whitespace runs -> one space, lowercase: transformers' CLIPTokenizer normalizer."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer():
    """CLIP's regex split, then the byte-level map (no prefix space): words as BPE sees them."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),  # as transformers (its GPT-2 regex changes nothing on CLIP's pieces)
    ])


_UNICODE_TO_BYTE = {u: b for b, u in bytes_to_unicode().items()}


class ClipTokenizer:
    """Prompts -> (B, max_length) int64 ids, as diffusers' ``tokenizer(prompts, padding="max_length",
    max_length=tokenizer.model_max_length, truncation=True)`` with transformers' ``CLIPTokenizer``.

    Thread safety: ``encode`` only reads; one instance may be shared by threads.
    """

    def __init__(self, tokenizer, *, max_length: int, bos: str, eos: str, pad: str, unk: str | None = None):
        from tokenizers import AddedToken

        self._tok = tokenizer
        self.max_length = max_length
        ids = {t: tokenizer.token_to_id(t) for t in (bos, eos, pad, unk or eos)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise BundleError(f"tokenizer: special token(s) {missing} are not in the vocabulary; the tokenizer files "
                              "do not belong together")
        # transformers registers bos/eos/unk/pad as special added tokens (matched verbatim before normalization),
        # so "<|endoftext|>" in a prompt is one id, and with SD2's pad "!" every "!" is a lone id 0.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(ids)])
        self.bos_id, self.eos_id, self.pad_id = ids[bos], ids[eos], ids[pad]

    @classmethod
    def from_dir(cls, path: Path, max_length: int | None = None) -> "ClipTokenizer":
        """Read a tokenizer folder: the files of ``TOKENIZER_FILES`` that it holds (see ``from_files``); nothing
        else in it is read. For a bundle's tokenizer use ``from_files(bundle.tokenizer_files())``: only the
        files its manifest pins."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"tokenizer folder not found: {path}")
        return cls.from_files({n: path / n for n in TOKENIZER_FILES if (path / n).is_file()}, max_length, where=path)

    @classmethod
    def from_files(cls, files: Mapping[str, Path], max_length: int | None = None, *,
                   where: str | Path | None = None) -> "ClipTokenizer":
        """Build the tokenizer from exactly these files (name -> path; names from ``TOKENIZER_FILES``):
        ``tokenizer.json`` when given (what transformers 5 saves and loads first), else CLIP's ``vocab.json`` +
        ``merges.txt``. Special tokens and ``model_max_length`` come from ``special_tokens_map.json`` /
        ``tokenizer_config.json``; ``max_length`` (the text encoder's length) wins. ``where`` names the folder
        in messages."""
        from tokenizers import Tokenizer
        from tokenizers.models import BPE

        unknown = sorted(set(files) - set(TOKENIZER_FILES))
        if unknown:
            raise BundleError(f"tokenizer: {unknown} are not tokenizer files; expected names from {list(TOKENIZER_FILES)}")
        files = {name: Path(p) for name, p in files.items()}
        path = Path(where) if where is not None else next(iter(files.values()), Path("tokenizer")).parent
        config = _read(files.get("tokenizer_config.json"))
        special = _read(files.get("special_tokens_map.json"))

        def get(key: str, default: str) -> str:
            value = _token(special.get(key)) or _token(config.get(key)) or default
            if not isinstance(value, str):
                raise BundleError(f"{path}: {key} must be a string, not {type(value).__name__}")
            return value

        bos, eos = get("bos_token", BOS), get("eos_token", EOS)
        unk, pad = get("unk_token", eos), get("pad_token", eos)
        if max_length is None:
            max_length = config.get("model_max_length", 77)
            if isinstance(max_length, bool) or not isinstance(max_length, int) or not 3 <= max_length <= 1 << 20:
                raise BundleError(f"{path / 'tokenizer_config.json'}: model_max_length={max_length!r}; expected the "
                                  "text encoder's length (77 for SD 1.x/2.x)")
        elif isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
            raise InputError(f"max_length={max_length!r}; expected an integer >= 3 (BOS, EOS and one token)")

        if "tokenizer.json" in files:
            try:
                tok = Tokenizer.from_str(_text(files["tokenizer.json"]))
            except BundleError:
                raise
            except Exception as exc:  # tokenizers raises a bare Exception with serde's message
                raise BundleError(f"{files['tokenizer.json']} cannot be read: {_first_line(exc)}") from None
            tok.post_processor = None  # BOS/EOS/padding are added by encode(), the same way for both formats
            tok.no_padding()
            tok.no_truncation()
        elif "vocab.json" in files and "merges.txt" in files:
            vocab = _read(files["vocab.json"])
            if not vocab or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
                raise BundleError(f"{files['vocab.json']} must map tokens to integer ids")
            merges = []
            for n, line in enumerate(_text(files["merges.txt"]).splitlines(), 1):
                if not line or (n == 1 and line.startswith("#version")):
                    continue
                pair = tuple(line.split(" "))
                if len(pair) != 2 or "".join(pair) not in vocab:
                    raise BundleError(f"{files['merges.txt']} line {n}: {line[:80]!r} is not a merge of this vocab.json")
                merges.append(pair)
            # CLIP's BPE: no sub-word prefix, "</w>" ends every word (transformers' CLIPTokenizer, same arguments)
            try:
                tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                                    end_of_word_suffix="</w>", fuse_unk=False, dropout=None))
            except Exception as exc:  # a merge whose parts are not in the vocabulary
                raise BundleError(f"{path}: vocab.json and merges.txt do not fit together: {_first_line(exc)}") from None
            tok.normalizer = clip_normalizer()
            tok.pre_tokenizer = clip_pre_tokenizer()
        else:
            raise BundleError(f"{path}: no tokenizer files; expected tokenizer.json, or vocab.json + merges.txt")
        return cls(tok, max_length=max_length, bos=bos, eos=eos, pad=pad, unk=unk)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, without BOS/EOS, padding or truncation (for chunked long prompts)."""
        if isinstance(texts, str) or not all(isinstance(p, str) for p in texts):
            raise InputError("prompts must be a list of strings (one per image)")
        for b, p in enumerate(texts):
            _check_unicode(p, b)
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, max_length) int64: BOS, tokens, EOS, then pad ids. A prompt longer than ``max_length - 2`` tokens is
        cut there, with a warning naming the words dropped (diffusers logs the same)."""
        tokens = self.token_ids(prompts)
        room = self.max_length - 2
        out = np.full((len(tokens), self.max_length), self.pad_id, dtype=np.int64)  # (B, max_length) int64
        for b, ids in enumerate(tokens):
            if len(ids) > room:
                cut = self.decode(ids[room:])
                cut = cut if len(cut) <= 200 else cut[:200] + "..."
                warnings.warn(f"prompt {b} is longer than the text encoder's {self.max_length} tokens; this part was "
                              f"cut: {cut!r}", stacklevel=2)
                ids = ids[:room]
            out[b, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (for messages): undo the byte-level map; "</w>" ends a word."""
        text = "".join(self._tok.id_to_token(int(i)) or "" for i in ids).replace("</w>", " ")
        data = bytes(_UNICODE_TO_BYTE.get(c, 32) for c in text)
        return " ".join(data.decode("utf-8", "replace").split())


def _token(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by transformers
        return value.get("content")
    return value


def _check_unicode(prompt: str, index: int) -> None:
    """A prompt must be Unicode text: a lone surrogate (what Python makes of non-UTF-8 bytes in a command line,
    "\udcff", or what an API caller passes by mistake) cannot be encoded, and `tokenizers` would raise TypeError."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"prompt {index} is not valid Unicode text (position {exc.start}: {prompt[exc.start]!r}, "
                         "a byte that is not UTF-8 or a lone surrogate); pass the prompt as UTF-8 text") from None


def _text(path: Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); re-export the bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def _read(path: Path | None) -> dict:
    """A JSON object, or {} when the file is absent (both special-token files are optional)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(_text(path))
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
