"""``Rotary``: rotary position embedding (RoPE) for ``MultiHeadAttention(..., rotary=...)``, in one numba call.

RoPE turns each query and key row by angles proportional to its token's position, so that q·k depends
on the positions' difference only. ``Rotary(head_dim, base)`` is the ``rotary=`` callable the layer
takes, ``(q, k, positions) -> (q, k)``, computed by one serial numba kernel for q and k together
(``numba_attn.kernels.rotary``) instead of the ~8 numpy operations of a hand-written one: in a decode
step each numpy operation's fixed cost is most of its time.

>>> import numpy as np
>>> import numba_attn
>>> rope = numba_attn.Rotary(head_dim=4, base=10000.0)
>>> q = np.ones((1, 2, 1, 4), np.float32)      # (batch, heads, tokens, head_dim)
>>> k = np.ones((1, 1, 1, 4), np.float32)
>>> q0, k0 = rope(q, k, positions=np.array([0]))  # position 0: no rotation
>>> bool((q0 == q).all() and (k0 == k).all())
True
>>> q1, _ = rope(q, k, positions=np.array([1]))   # plane 0 (dims 0 and 2) turns by 1 radian
>>> [round(float(v), 4) for v in q1[0, 0, 0]]
[-0.3012, 0.99, 1.3818, 1.0099]

Conventions: ``interleaved=False`` (default) pairs dims i and i + D/2 (GPT-NeoX, Hugging Face's Llama,
SmolLM2); ``interleaved=True`` pairs 2i and 2i + 1 (GPT-J, Meta's original Llama, llama.cpp's GGUF
layout before un-permuting). Frequencies f_i = base^(−2i/D); cosines and sines of positions below
``max_positions`` are tabled in float64 at construction, later positions computed on the fly (an
endless streaming chat keeps working).
"""

import numbers

import numpy as np

from .kernels import rotary as _k

__all__ = ["Rotary"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _rows(x, name, head_dim):
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a float16/float32/float64 array (batch, heads, T, head_dim), got dtype {x.dtype}"
        )
    if x.ndim != 4 or x.shape[3] != head_dim:
        raise ValueError(f"{name} must have shape (batch, heads, T, head_dim={head_dim}), got {x.shape}")
    return x.astype(np.float32) if x.dtype == np.float16 else x


class Rotary:
    """Rotary position embedding of ``head_dim``-wide heads: ``rope(q, k, positions) -> (q, k)``.

    ``head_dim`` even; ``base`` the frequency base (10000 for most models, 100000 for SmolLM2, 500000
    for Llama 3); ``max_positions`` how many positions to table (later ones are computed per call);
    ``interleaved``: pair dims (2i, 2i + 1) instead of (i, i + D/2).

    ``q`` (batch, H, T, head_dim) and ``k`` (batch, H_kv, T, head_dim) float16/32/64 and ``positions``
    (T,) non-negative integers (a token's absolute position); returns new arrays (float32, or float64
    for float64 input; inputs never modified). ``rope.rotate(x, positions)`` rotates one tensor.
    """

    __slots__ = ("_cos", "_sin", "base", "head_dim", "interleaved", "inv_freq", "max_positions")

    def __init__(self, head_dim, base=10000.0, max_positions=4096, interleaved=False):
        if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, numbers.Real) or not (1.0 < float(base) < float("inf")):
            raise ValueError(f"base must be a finite number > 1, got {base!r}")
        if isinstance(max_positions, bool) or not isinstance(max_positions, numbers.Integral) or max_positions < 0:
            raise ValueError(f"max_positions must be a non-negative int, got {max_positions!r}")
        self.head_dim, self.base = int(head_dim), float(base)
        self.max_positions, self.interleaved = int(max_positions), bool(interleaved)
        self.inv_freq = 1.0 / self.base ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.arange(self.max_positions, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        self._cos, self._sin = np.cos(angles), np.sin(angles)

    def _positions(self, positions, T):
        p = positions if isinstance(positions, np.ndarray) else np.asarray(positions)
        if p.dtype.kind not in "iu":
            raise TypeError(f"positions must be an integer array (T,), got dtype {p.dtype}")
        if p.shape != (T,):
            raise ValueError(f"positions must have shape (T,) = ({T},) like the rows' token axis, got {p.shape}")
        if T and (int(p[0]) if T == 1 else int(p.min())) < 0:  # (a decode step: no numpy reduction)
            raise ValueError("positions must be non-negative")
        return p if p.dtype == np.int64 else p.astype(np.int64)

    def __call__(self, q, k, positions):
        """(q, k) rotated for their tokens' ``positions``: see the class docstring."""
        q = _rows(q, "q", self.head_dim)
        k = _rows(k, "k", self.head_dim)
        if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
            raise ValueError(f"k must have q's batch and token count ({q.shape[0]}, _, {q.shape[2]}, _), got {k.shape}")
        if k.dtype != q.dtype:
            k = k.astype(np.result_type(q.dtype, k.dtype))
            q = q.astype(k.dtype)
        p = self._positions(positions, q.shape[2])
        q_out, k_out = np.empty(q.shape, q.dtype), np.empty(k.shape, k.dtype)
        _k.rotary_pair(q, k, p, self._cos, self._sin, self.inv_freq, self.interleaved, q_out, k_out)
        return q_out, k_out

    def rotate(self, x, positions):
        """One tensor (batch, heads, T, head_dim) rotated for ``positions``."""
        x = _rows(x, "x", self.head_dim)
        p = self._positions(positions, x.shape[2])
        out = np.empty(x.shape, x.dtype)
        none = out[:, :0]
        _k.rotary_pair(x, none, p, self._cos, self._sin, self.inv_freq, self.interleaved, out, none)
        return out

    def __repr__(self):
        return (
            f"Rotary(head_dim={self.head_dim}, base={self.base:g}, max_positions={self.max_positions}, "
            f"interleaved={self.interleaved})"
        )
