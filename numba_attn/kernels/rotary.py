"""Rotary position embedding (RoPE) of query and key rows: both tensors in one serial call.

Maths. A row x (D,) of a token at position p is rotated in D/2 planes: plane i holds the pair
(a, b) = (x[i], x[i + D/2]) (``interleaved=False``: GPT-NeoX / Hugging Face "rotate half") or
(x[2i], x[2i + 1]) (``interleaved=True``: GPT-J, Meta's original Llama, llama.cpp), turned by the
angle θ = p·f_i with f_i = base^(−2i/D):

    a' = a·cos θ − b·sin θ,     b' = b·cos θ + a·sin θ

cos θ and sin θ come from float64 tables (positions × D/2, built by ``numba_attn.rotary.Rotary``), or,
for a position past the table, are computed here in float64; both are rounded once to the rows' dtype
(float32, or float64 for float64 rows), in which the products are taken.

Memory: reads every row once and writes its rotated copy (the inputs are never modified); D/2 cosines
and sines of scratch per position. Serial: a decode step rotates a few heads of one token (~1 µs of
work), and a prefill's rotation is a pass over q and k, far below the attention that follows.
"""

import numpy as np
from numba import njit

from .. import config


@njit(fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE, inline="always")
def _rotate_heads(x, out, t, cs, sn, interleaved):
    """out[b, h, t] = the rotation of x[b, h, t] by the planes' cosines ``cs`` and sines ``sn``."""
    B, H, _, D = x.shape
    half = D // 2
    for b in range(B):
        for h in range(H):
            row = x[b, h, t]
            rotated = out[b, h, t]
            if interleaved:
                for i in range(half):
                    first, second = row[2 * i], row[2 * i + 1]
                    rotated[2 * i] = first * cs[i] - second * sn[i]
                    rotated[2 * i + 1] = second * cs[i] + first * sn[i]
            else:
                for i in range(half):
                    first, second = row[i], row[i + half]
                    rotated[i] = first * cs[i] - second * sn[i]
                    rotated[i + half] = second * cs[i] + first * sn[i]


@njit(fastmath=config.FASTMATH, error_model=config.ERROR_MODEL, cache=config.CACHE)
def rotary_pair(q, k, positions, cos, sin, inv_freq, interleaved, q_out, k_out):
    """q_out, k_out = q, k (B, H, T, D) and (B, H_kv, T, D) rotated for the token positions ``positions``
    (T,) int64; ``cos``/``sin`` (P, D/2) float64 tables of positions 0 … P−1, ``inv_freq`` (D/2,) float64
    the planes' frequencies (for positions ≥ P). q_out/k_out: C-contiguous, of the rows' dtype."""
    T = positions.shape[0]
    half = inv_freq.shape[0]
    P = cos.shape[0]
    dt = q_out.dtype
    cs = np.empty(half, dt)
    sn = np.empty(half, dt)
    for t in range(T):
        p = positions[t]
        if p < P:
            for i in range(half):
                cs[i] = cos[p, i]
                sn[i] = sin[p, i]
        else:
            for i in range(half):
                angle = np.float64(p) * inv_freq[i]
                cs[i] = np.cos(angle)
                sn[i] = np.sin(angle)
        _rotate_heads(q, q_out, t, cs, sn, interleaved)
        _rotate_heads(k, k_out, t, cs, sn, interleaved)
