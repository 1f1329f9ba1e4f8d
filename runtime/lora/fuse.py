"""The arithmetic: W' = W + sum_i weight_i * scale_i * (B_i @ A_i), from the base weights, in float32.

Always from the base weights the bundle stores, never from a previously fused weight: a swap A -> B -> A computes
A's weights from the same inputs in the same order, so it gives A's images bit for bit (TensorRT #3628 is the
failure of adding deltas to the previous LoRA's weights). Layers are added one LoRA at a time, as PEFT merges
adapters (``base_layer.weight += (B @ A) * scaling``), in float32 as diffusers' fp32 fuse does.

Everything is computed in the layout the graph stores: a Linear exported as MatMul keeps W^T (in, out), whose
delta is (B @ A)^T = A^T @ B^T — one small GEMM writing the stored layout directly. Transposing the large base to
PyTorch's layout and back (two strided copies of every weight) cost more than the products themselves.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .formats import LoraLayer


def delta(layer: LoraLayer, shape: tuple[int, ...], *, transposed: bool = False) -> np.ndarray:
    """B @ A of one layer in the weight's PyTorch layout ``shape`` ((out, in) or (out, in, kh, kw)), float32; with
    ``transposed`` (a Linear stored as (in, out)) its transpose A^T @ B^T, (in, out). A conv LoRA's product is
    (out, r) @ (r, in*kh*kw), which is PEFT's conv2d of the two factors."""
    out, r = layer.up.shape[0], layer.up.shape[1]
    up = layer.up.reshape(out, r)
    down = layer.down.reshape(r, -1)
    if transposed:
        return down.T @ up.T  # (in, r) @ (r, out) = (in, out) float32, C-contiguous
    return (up @ down).reshape(shape)  # (out, in[, kh, kw]) float32


def fused(base: np.ndarray, terms: Sequence[tuple[LoraLayer, float]], shape: tuple[int, ...], *,
          transposed: bool = False, own: bool = False) -> np.ndarray:
    """A C-contiguous float32 array: ``base`` (the stored layout: PyTorch's ``shape``, or its transpose (in, out)
    when ``transposed``; any float dtype) plus each layer's product times its factor (the user's weight x the
    layer's alpha / rank). ``base`` is never written unless ``own`` says it is the caller's private copy, which
    is then summed into in place when it is already C-contiguous float32 (no second copy of a large weight)."""
    reuse = own and base.dtype == np.float32 and base.flags.c_contiguous and base.flags.writeable
    w = base if reuse else np.array(base, dtype=np.float32, order="C", copy=True)
    for layer, factor in terms:
        d = delta(layer, shape, transposed=transposed)  # a new array: scaled in place, then added
        d *= np.float32(factor)
        w += d
    return w
