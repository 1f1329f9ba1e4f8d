"""T5's tokenizer (SD3's ``tokenizer_3``, FLUX's ``tokenizer_2``), run from the bundle's ``tokenizer.json`` with the
`tokenizers` library: the SentencePiece model is not needed at run time (T5TokenizerFast writes tokenizer.json).

Ids as diffusers gets them from ``tokenizer_3(prompts, padding="max_length", max_length=L, truncation=True,
add_special_tokens=True)``: the prompt's pieces, cut to L - 1, then ``</s>`` (T5's post-processor "$A </s>"), then
``<pad>`` up to L. The truncation is done here rather than by the shared Tokenizer object's settings, so one
instance serves calls with different lengths from several threads.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import BundleError, InputError


class T5Tokenizer:
    """Prompts -> (B, L) int64 ids. Thread safety: ``encode`` only reads; one instance may be shared."""

    def __init__(self, tokenizer, *, eos_id: int, pad_id: int):
        self._tok = tokenizer
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_files(cls, files: Mapping[str, Path]) -> "T5Tokenizer":
        """From a tokenizer folder's files by name (``Bundle.tokenizer_files``): reads ``tokenizer.json`` and, when
        present, the pad / eos tokens ``tokenizer_config.json`` names."""
        from tokenizers import Tokenizer

        path = files.get("tokenizer.json")
        if path is None:
            raise BundleError("the T5 tokenizer folder has no tokenizer.json (only T5TokenizerFast's tokenizer.json "
                              "is read); re-export the bundle from a pipeline saved with the fast tokenizer")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"{path}: not a tokenizers tokenizer.json ({first})") from None
        config = {}
        if "tokenizer_config.json" in files:
            try:
                config = json.loads(Path(files["tokenizer_config.json"]).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BundleError(f"{files['tokenizer_config.json']}: unreadable ({exc})") from None
        ids = {}
        for role, default in (("eos_token", "</s>"), ("pad_token", "<pad>")):
            token = config.get(role, default)
            token = token.get("content", default) if isinstance(token, dict) else token
            ids[role] = tok.token_to_id(str(token))
            if ids[role] is None:
                raise BundleError(f"{path}: the T5 vocabulary has no {role} {token!r}")
        return cls(tok, eos_id=ids["eos_token"], pad_id=ids["pad_token"])

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's pieces, without the end token and without truncation."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, prompts: Sequence[str], max_length: int) -> np.ndarray:
        if not isinstance(max_length, int) or max_length < 1:
            raise InputError(f"max_sequence_length {max_length!r}; expected a positive integer")
        out = np.full((len(prompts), max_length), self.pad_id, np.int64)  # (B, L) int64
        for k, ids in enumerate(self.token_ids(prompts)):
            if len(ids) > max_length - 1:  # diffusers logs the same cut as a warning
                dropped = self._tok.decode(ids[max_length - 1:])
                warnings.warn(f"a T5 prompt was cut to max_sequence_length={max_length} tokens; dropped: "
                              f"{dropped[:200]!r}", stacklevel=2)
            row = ids[:max_length - 1] + [self.eos_id]
            out[k, :len(row)] = row
        return out


T5_LIMIT = 512  # StableDiffusion3Pipeline and FluxPipeline refuse max_sequence_length above this


def sequence_length(n, *, default: int, limit: int) -> int:
    """A call's ``max_sequence_length`` (None: ``default``) checked against the bundle's exported ``limit``: one
    line saying how to get a longer one (no re-export helps past T5_LIMIT, which diffusers refuses too)."""
    if n is None:
        return default
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"max_sequence_length={n!r}; expected a positive integer (T5's token count, default "
                         f"{default})")
    if n > limit:
        hint = (f"diffusers takes at most {T5_LIMIT}" if limit >= T5_LIMIT else
                f"re-export with edgediff export --max-sequence-length {min(int(n), T5_LIMIT)}")
        raise InputError(f"max_sequence_length={n} is over this bundle's limit {limit}; lower it ({hint})")
    return int(n)
