"""Long and weighted prompts for CLIP text conditioning (SD 1.x/2.x), the AUTOMATIC1111 way.

Grammar (A1111's ``parse_prompt_attention``):

    (words)        weight x 1.1              ((words)) = x 1.21, nesting multiplies
    (words:1.3)    weight x 1.3              any number: (words:0.5), (words:2)
    [words]        weight / 1.1
    \\( \\) \\[ \\]    a literal bracket          \\\\ is a literal backslash
    :              a literal colon unless it gives the weight of a round bracket

Adjacent pieces of equal weight are joined before they are tokenized, as in A1111 ("(a)(b)" is "ab" at 1.1). Unlike
A1111, an unbalanced bracket is refused (InputError naming its character) instead of being closed silently, and a
weight that is not a number is refused instead of crashing.

Long prompts: the tokens are cut into chunks of ``max_length - 2`` (75 for CLIP), each encoded separately as
``BOS + tokens + EOS + padding`` and the hidden states concatenated along the sequence (A1111's and compel's
convention; no comma back-tracking). Every prompt of a call (negatives included) is padded to the same number of
chunks with the empty prompt's chunk (BOS, EOS, padding), as A1111's ``pad_cond`` and compel do, so the denoiser sees
one (batch, chunks x 77, D) tensor.

Weights (A1111's "Original" emphasis): each chunk's hidden states are multiplied token-wise by the weights, then
rescaled so the chunk's mean equals its unweighted mean. A1111 takes that mean over the whole batch of a chunk; here
it is taken per prompt (the same with one prompt), so an image does not depend on the other prompts of its batch.
A prompt whose weights are all 1 is not touched: plain prompts give exactly diffusers' embeddings.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InputError

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (...) and [...]

# A1111's tokens: escapes, brackets, a ":weight)" that closes a round bracket, text, a lone colon
_TOKEN = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)


@dataclass(frozen=True)
class WeightedTokens:
    """One prompt as token ids (no BOS/EOS) with one weight each."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def parse(text: str, *, what: str = "prompt") -> list[tuple[str, float]]:
    """``text`` -> [(piece, weight)], pieces of equal weight joined; [("", 1.0)] for an empty prompt.

    >>> parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:2]
    [('a ', 1.0), ('house', 1.5730000000000004)]
    """
    res: list[list] = []  # [piece, weight]
    starts: dict[str, list[tuple[int, int]]] = {"(": [], "[": []}  # open bracket -> [(first piece, character)]

    def multiply(start: int, factor: float) -> None:  # in place, piece by piece, in A1111's order (same floats)
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])  # "\(" -> "(", "\\" -> "\", a lone "\" -> nothing (as A1111)
        elif tok in ("(", "["):
            starts[tok].append((len(res), m.start()))
        elif weight is not None:
            if not starts["("]:
                raise _unbalanced(what, ")", m.end() - 1, "has no '(' before it", text)
            try:
                factor = float(weight)
            except ValueError:
                factor = math.nan
            if not math.isfinite(factor):
                raise InputError(f"{what}: the weight {weight!r} at character {m.start(1) + 1} is not a number; "
                                 "write it like (word:1.3)")
            multiply(starts["("].pop()[0], factor)
        elif tok in (")", "]"):
            opener = "(" if tok == ")" else "["
            if not starts[opener]:
                raise _unbalanced(what, tok, m.start(), f"has no '{opener}' before it", text)
            multiply(starts[opener].pop()[0], ROUND if tok == ")" else SQUARE)
        else:
            res.append([tok, 1.0])
    open_ = sorted(pos for stack in starts.values() for _, pos in stack)
    if open_:
        pos = open_[0]
        raise _unbalanced(what, text[pos], pos, "is never closed", text)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for piece, w in res[1:]:
        if w == merged[-1][1]:
            merged[-1][0] += piece
        else:
            merged.append([piece, w])
    return [(p, w) for p, w in merged]


def _unbalanced(what: str, bracket: str, pos: int, problem: str, text: str) -> InputError:
    closer = {"(": ")", "[": "]"}.get(bracket)
    fix = f"close it with '{closer}'" if closer else "remove it"
    near = text[max(0, pos - 15): pos + 15]
    return InputError(f"{what}: unbalanced '{bracket}' at character {pos + 1} ({near!r}) {problem}; {fix}, or "
                      f"write \\{bracket} for a literal bracket")


def weighted_tokens(tokenizer, texts: Sequence[str], *, what: str = "prompt") -> list[WeightedTokens]:
    """Parse each text and tokenize its pieces (each piece separately, as A1111 does)."""
    out = []
    for k, text in enumerate(texts):
        pieces = parse(text, what=what if len(texts) == 1 else f"{what} {k}")
        ids: list[int] = []
        weights: list[float] = []
        for piece_ids, (_, w) in zip(tokenizer.token_ids([p for p, _ in pieces]), pieces):
            ids += piece_ids
            weights += [w] * len(piece_ids)
        out.append(WeightedTokens(tuple(ids), tuple(weights)))
    return out


@dataclass(frozen=True)
class Chunks:
    """What the text encoder runs and how its output is weighted."""

    ids: np.ndarray  # (T, C, L) int64: T prompts, C chunks of L = max_length tokens each
    weights: np.ndarray | None  # (T, C, L) float32 per-token weights; None when every weight is 1

    def apply(self, hidden: np.ndarray) -> np.ndarray:
        """Text-encoder output (T * C, L, D) float32 -> (T, C * L, D): weighted, chunks joined along the sequence."""
        t, c, length = self.ids.shape
        z = hidden.reshape(t, c, length, -1)  # (T, C, L, D)
        if self.weights is not None:
            z = emphasize(z, self.weights)
        return np.ascontiguousarray(z.reshape(t, c * length, -1), dtype=np.float32)


def emphasize(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis per prompt and chunk: z * w, rescaled to the unweighted mean.
    ``z`` (T, C, L, D) float32, ``weights`` (T, C, L) float32."""
    before = z.mean(axis=(2, 3), dtype=np.float64)  # (T, C)
    out = z * weights[..., None]
    after = out.mean(axis=(2, 3), dtype=np.float64)  # (T, C)
    # a chunk whose weights cancel its mean exactly (only reachable with weights <= 0) is left unscaled
    ratio = np.divide(before, after, out=np.ones_like(before), where=after != 0)
    untouched = (weights == 1.0).all(axis=2)  # (T, C): chunks without weights stay bit-identical
    out = np.where(untouched[..., None, None], z, out * ratio[..., None, None].astype(np.float32))
    return out.astype(np.float32)


def chunk(tokenizer, prompts: Sequence[WeightedTokens], *, long: bool, what: str = "prompt") -> Chunks:
    """Cut and pad every prompt to the same number of chunks. ``long`` False (the denoiser's text axis is fixed
    at ``max_length``): one chunk each, the rest cut with a warning naming the dropped words, as diffusers does."""
    room = tokenizer.max_length - 2  # BOS and EOS around each chunk
    prompts = list(prompts)
    if not long:
        for k, p in enumerate(prompts):
            if len(p.ids) > room:
                cut = tokenizer.decode(p.ids[room:])
                cut = cut if len(cut) <= 200 else cut[:200] + "..."
                warnings.warn(f"{what} {k} is longer than the text encoder's {tokenizer.max_length} tokens and this "
                              "denoiser takes only that many (its text axis is fixed: a static bundle or a TensorRT "
                              f"engine); this part was cut: {cut!r}", stacklevel=3)
                prompts[k] = WeightedTokens(p.ids[:room], p.weights[:room])
    chunks = max(max(1, -(-len(p.ids) // room)) for p in prompts)
    ids = np.full((len(prompts), chunks, tokenizer.max_length), tokenizer.pad_id, np.int64)  # (T, C, L)
    weights = np.ones(ids.shape, np.float32)  # (T, C, L)
    for t, p in enumerate(prompts):
        for c in range(chunks):
            part = p.ids[c * room:(c + 1) * room]
            ids[t, c, : len(part) + 2] = [tokenizer.bos_id, *part, tokenizer.eos_id]
            weights[t, c, 1: len(part) + 1] = p.weights[c * room:(c + 1) * room]
    return Chunks(ids=ids, weights=weights if any(p.weighted for p in prompts) else None)
